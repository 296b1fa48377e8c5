"""Serving BLIP-2: the FastAPI server, upload validation, micro-batching (and the Gradio app, LangChain tools).

Optional extras: nothing here is imported by ``lavis_ext.register()``, and this package imports nothing itself,
so ``from lavis_ext.serve.uploads import ...`` costs only PIL. Start the server with ``lavis-ext serve``.
"""
