"""Benchmarks and the tools they need: the engine against upstream ChatTTS
(`ttspool bench`), and ranged fetching against one stream (with a local Range server)."""
