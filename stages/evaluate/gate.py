"""The accuracy gate: enough eval documents of every requested type, thresholds per document type,
the type accuracy of routed documents,
no regression against the champion evaluated on the same eval set and, where configured, the fit
check: the training sample reaches its thresholds and its image control falls far enough below
it (the answers come from the pixels). The DAG branches on ``passed``; reasons say why."""

from __future__ import annotations

from pydantic import BaseModel

from docpipe.answering.scoring import HEADLINE
from docpipe.config import EvaluationConfig

GATED = HEADLINE
NO_REGRESSION = ("field_accuracy", "document_accuracy")


class Check(BaseModel):
    rule: str  # "eval_documents", "threshold", "type_accuracy", "no_regression", "fit_threshold", "image_dependence"
    scope: str  # a document type, "overall", or "train sample"
    metric: str
    value: float
    limit: float  # the least the value may be; for image_dependence, the most
    passed: bool

    @classmethod
    def at_least(cls, rule: str, scope: str, metric: str, value: float, limit: float) -> Check:
        """A check that passes when ``value`` reaches ``limit``."""
        return cls(rule=rule, scope=scope, metric=metric, value=value, limit=limit, passed=value >= limit)

    @property
    def failure(self) -> str:
        if self.rule == "eval_documents":
            return (
                f"{self.scope}: {self.value:.0f} eval documents, fewer than evaluation.min_eval_documents "
                f"({self.limit:.0f}): its accuracy is not measured well enough to gate on"
            )
        if self.rule == "image_dependence" and not self.limit:
            return f"{self.scope}: the fit's {self.metric} is 0: nothing shows that the answers depend on the image"
        if self.rule == "image_dependence":
            return (
                f"{self.scope}: {self.metric} with swapped images {self.value:.4f} > {self.limit:.4f} (the "
                "fit's share allowed): the answers do not depend enough on the image"
            )
        against = {
            "no_regression": "the champion's less the tolerance",
            "fit_threshold": "the fit threshold",
            "type_accuracy": "evaluation.type_accuracy: documents whose type the model names right",
        }
        limit = against.get(self.rule, "the threshold")
        return f"{self.scope}: {self.metric} {self.value:.4f} < {self.limit:.4f} ({limit})"


class Decision(BaseModel):
    passed: bool
    reasons: list[str]
    checks: list[Check]
    eval_set: str | None
    champion_eval_set: str | None = None
    doc_types: dict[str, int] = {}  # every requested type, and its eval documents
    notes: list[str] = []  # what was compared, or skipped, and why


def decide(
    metrics: dict,
    config: EvaluationConfig,
    eval_set: str | None,
    champion: dict | None = None,
    champion_eval_set: str | None = None,
    fit: dict | None = None,
    control: dict | None = None,
    requested: list[str] | None = None,
) -> Decision:
    """Apply the thresholds, the no-regression rule where a champion's metrics are given, and the fit
    check's rules where ``evaluation.fit_check`` sets them. Every ``requested`` type (default: the
    evaluated ones) needs ``min_eval_documents``: a type with none is not skipped, it fails."""
    reasons: list[str] = []
    counts = {
        t: metrics["per_doc_type"].get(t, {}).get("documents", 0)
        for t in dict.fromkeys([*(requested or []), *metrics["per_doc_type"]])
    }
    checks = _document_count_checks(counts, config) + _threshold_checks(metrics, config)
    if metrics.get("routing"):
        value = metrics["routing"]["type_accuracy"]
        checks.append(Check.at_least("type_accuracy", "overall", "type_accuracy", value, config.type_accuracy))
    if champion is not None and champion_eval_set != eval_set:
        reasons.append(
            f"the champion was evaluated on eval set {champion_eval_set}, not {eval_set}: "
            "evaluate it on this one before comparing"
        )
    elif champion is not None:
        checks += _regression_checks(metrics, champion, config)
    checks += _fit_checks(config, fit, control, reasons)
    reasons += [check.failure for check in checks if not check.passed]
    if not metrics["per_doc_type"]:
        reasons.append("no document was evaluated")
    return Decision(
        passed=not reasons,
        reasons=reasons or ["every check passed"],
        checks=checks,
        eval_set=eval_set,
        champion_eval_set=champion_eval_set,
        doc_types=counts,
    )


def _document_count_checks(counts: dict[str, int], config: EvaluationConfig) -> list[Check]:
    """Enough eval documents of every requested type to gate on."""
    least = config.min_eval_documents
    return [Check.at_least("eval_documents", doc_type, "documents", n, least) for doc_type, n in counts.items()]


def _threshold_checks(metrics: dict, config: EvaluationConfig) -> list[Check]:
    """Each evaluated type's headline metrics against its thresholds."""
    return [
        Check.at_least("threshold", doc_type, metric, values[metric], getattr(config.thresholds_for(doc_type), metric))
        for doc_type, values in metrics["per_doc_type"].items()
        for metric in GATED
    ]


def _regression_checks(metrics: dict, champion: dict, config: EvaluationConfig) -> list[Check]:
    """Overall and per type (where the champion has the type): no worse than the champion, less the tolerance."""
    scopes = {"overall": (metrics["overall"], champion["overall"])}
    scopes |= {
        t: (metrics["per_doc_type"][t], champion["per_doc_type"][t])
        for t in metrics["per_doc_type"]
        if t in champion.get("per_doc_type", {})
    }
    return [
        Check.at_least("no_regression", scope, metric, mine[metric], theirs[metric] - config.regression_tolerance)
        for scope, (mine, theirs) in scopes.items()
        for metric in NO_REGRESSION
    ]


def _fit_checks(config: EvaluationConfig, fit: dict | None, control: dict | None, reasons: list[str]) -> list[Check]:
    """The fit check's rules; a rule whose measurement is missing fails with a reason."""
    settings, scope, checks = config.fit_check, "train sample", []
    if settings.thresholds is not None:
        if fit is None:
            reasons.append("evaluation.fit_check.thresholds is set but no training document was answered")
        else:
            thresholds = settings.thresholds
            checks += [
                Check.at_least("fit_threshold", scope, m, fit["overall"][m], getattr(thresholds, m)) for m in GATED
            ]
    if settings.max_control_ratio is not None:
        if fit is None or control is None:
            reasons.append(
                "evaluation.fit_check.max_control_ratio is set but no image control ran (it needs two "
                "or more training documents)"
            )
        else:
            value = control["overall"]["field_accuracy"]
            limit = settings.max_control_ratio * fit["overall"]["field_accuracy"]
            checks.append(
                Check(
                    rule="image_dependence",
                    scope=scope,
                    metric="field_accuracy",
                    value=value,
                    limit=limit,
                    passed=limit > 0 and value <= limit,
                )
            )
    return checks
