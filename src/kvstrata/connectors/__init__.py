"""Engine connectors: vLLM's KV connector API on top of the orchestrator."""
