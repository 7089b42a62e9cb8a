"""Engines behind one interface (`base.Engine`): built-in torch, mocker (simulated), TRT-LLM."""
