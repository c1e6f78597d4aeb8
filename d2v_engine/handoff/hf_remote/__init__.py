"""Hugging Face remote-code files written next to an exported model that transformers has no class
for (d2v_engine.handoff.export_remote); each file imports only torch and transformers."""
