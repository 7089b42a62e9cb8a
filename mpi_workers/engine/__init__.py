"""Engines behind one interface (`base.Engine`): the built-in torch engine, later mocker and TensorRT-LLM."""
