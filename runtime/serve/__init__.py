"""sdrt as a service (`pip install 'sdrt[serve]'`, then `sdrt serve`): AUTOMATIC1111's API, OpenAI's images API
and async jobs on one FastAPI app, with requests batched across clients.

    schemas.py   every request and response (pydantic)
    a1111.py, openai_api.py, jobs.py, ops.py   routes: validate, enqueue, answer
    batcher.py   the queue, limits, timeouts and cancellation; runs the Pipeline's steps, one worker per model
    media.py     image decoding (bomb-safe), PNGs with their parameters, latent previews
    app.py       create_app(ServeConfig) -> FastAPI; error handlers; API key and body-limit middleware
    server.py    uvicorn with a graceful drain on SIGTERM/SIGINT
"""

from sdrt.serve.app import ServeConfig, create_app
from sdrt.serve.batcher import Batcher
from sdrt.serve.limits import Limits

__all__ = ["create_app", "ServeConfig", "Batcher", "Limits"]
