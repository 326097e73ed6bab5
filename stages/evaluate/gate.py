"""The accuracy gate: thresholds per document type, and no regression against the champion
evaluated on the same eval-set version. The DAG branches on ``passed``; reasons say why."""

from __future__ import annotations

from pydantic import BaseModel

from stages.config import EvaluationConfig

GATED = ("field_accuracy", "document_accuracy", "json_validity")
NO_REGRESSION = ("field_accuracy", "document_accuracy")


class Check(BaseModel):
    rule: str  # "threshold" or "no_regression"
    scope: str  # a document type, or "overall"
    metric: str
    value: float
    limit: float
    passed: bool


class Decision(BaseModel):
    passed: bool
    reasons: list[str]
    checks: list[Check]
    eval_set: str | None
    champion_eval_set: str | None = None


def decide(metrics: dict, config: EvaluationConfig, eval_set: str | None, champion: dict | None = None,
           champion_eval_set: str | None = None) -> Decision:  # fmt: skip
    """Apply the thresholds and, where a champion's metrics are given, the no-regression rule."""
    checks: list[Check] = []
    reasons: list[str] = []
    for doc_type, values in metrics["per_doc_type"].items():
        thresholds = config.thresholds_for(doc_type)
        for metric in GATED:
            limit = getattr(thresholds, metric)
            checks.append(Check(rule="threshold", scope=doc_type, metric=metric, value=values[metric], limit=limit,
                                passed=values[metric] >= limit))  # fmt: skip
    if champion is not None:
        if champion_eval_set != eval_set:
            reasons.append(f"the champion was evaluated on eval set {champion_eval_set}, not {eval_set}: "
                           "evaluate it on this one before comparing")  # fmt: skip
        else:
            scopes = {"overall": (metrics["overall"], champion["overall"])}
            scopes |= {t: (metrics["per_doc_type"][t], champion["per_doc_type"][t])
                       for t in metrics["per_doc_type"] if t in champion.get("per_doc_type", {})}  # fmt: skip
            for scope, (mine, theirs) in scopes.items():
                for metric in NO_REGRESSION:
                    limit = theirs[metric] - config.regression_tolerance
                    checks.append(Check(rule="no_regression", scope=scope, metric=metric, value=mine[metric],
                                        limit=limit, passed=mine[metric] >= limit))  # fmt: skip
    for check in checks:
        if not check.passed:
            against = "the champion's less the tolerance" if check.rule == "no_regression" else "the threshold"
            reasons.append(f"{check.scope}: {check.metric} {check.value:.4f} < {check.limit:.4f} ({against})")
    if not metrics["per_doc_type"]:
        reasons.append("no document was evaluated")
    return Decision(passed=not reasons, reasons=reasons or ["every check passed"], checks=checks,
                    eval_set=eval_set, champion_eval_set=champion_eval_set)  # fmt: skip
