"""The LLM judge over the CoT: cheap triage, then an OpenAI-compatible judge model."""
