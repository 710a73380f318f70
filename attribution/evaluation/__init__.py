"""How good an attribution is: the LDS harness (``lds``, ``lm_lds``), rank statistics (``metrics``), the
fact-tracing task and its retrieval metrics (``facts``), fidelity against exact gradients (``fidelity``), and
the small tasks they run on (``examples``: digits; ``lm_lds``: a character-level GPT)."""
