"""An OpenAI-compatible server: `python -m offload_runtime.serve --model M` (needs the `serve` extra).

Concurrent requests join the running batch between steps, so they share each weight sweep of the target.
protocol.py checks requests and shapes replies (no web framework), worker.py is the engine's thread, app.py the
FastAPI routes, launch.py runs the server as a child process, __main__.py is the command line. Nothing here is
imported by the rest of the runtime.
"""
