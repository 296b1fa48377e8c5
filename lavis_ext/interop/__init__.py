"""Interop with the tools BLIP-2 users deploy with: Hugging Face ``Blip2ForConditionalGeneration``
(:mod:`.hf_bridge`), ONNX (:mod:`.onnx_export`) and TensorRT (:mod:`.tensorrt_build`).

Nothing is imported here: each submodule pulls in its own optional dependencies (onnx, onnxruntime,
tensorrt) only when used, so ``lavis_ext.register()`` stays cheap.
"""
