# vLLM serving image for one published model version. stages.publish builds it from a context it
# assembles: this file, serve.yaml (the server's flags, from `publish.serving` of the config),
# request.json (a request a client can copy: the question, routed where the run is, and the
# answer's schema as response_format; its image a placeholder) and model/ (the patched weights when publish.model_source is baked; empty when vLLM streams them
# from the artifact store at start, serve.yaml then naming the s3:// location).
# BASE_IMAGE: the official vLLM OpenAI server, pinned; where nothing can be pulled, the tests
# build a stand-in whose `vllm serve` runs the same API on CPU (tests/fixtures/vllm-standin/).
ARG BASE_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${BASE_IMAGE}

COPY serve.yaml /etc/vllm/serve.yaml
COPY request.json /etc/vllm/request.json
COPY model/ /models/served/

ARG MODEL_VERSION=unknown
LABEL org.opencontainers.image.version=${MODEL_VERSION}
ENV HF_HUB_OFFLINE=1
EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
CMD ["--config", "/etc/vllm/serve.yaml"]
