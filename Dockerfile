# Hugging Face Space (sdk: docker) image: the same setup as `make run`, served on port 7860
# as a non-root user. Build: docker build -t entrodrop-studio . ; run: docker run -p 7860:7860 entrodrop-studio
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/app/.venv/bin:$PATH \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    PYTHONUNBUFFERED=1
WORKDIR /home/user/app

# Dependencies first so code edits do not reinstall them.
COPY --chown=user requirements.txt requirements-dev.txt pyproject.toml Makefile README.md ./
COPY --chown=user entrodrop ./entrodrop
RUN make setup

COPY --chown=user . .
EXPOSE 7860
CMD ["make", "run"]
