"""EntroDrop Studio: ``python app.py`` serves the web app on http://127.0.0.1:7860.

Set GRADIO_SERVER_NAME (e.g. 0.0.0.0) and GRADIO_SERVER_PORT to serve elsewhere. The bundled
model starts loading in the background at launch, so it is ready when the page opens.
"""

import logging

from entrodrop.ui import build_app, launch


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launch(build_app())


if __name__ == "__main__":
    main()
