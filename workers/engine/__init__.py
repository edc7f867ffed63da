"""The synthesis engine: ChatTTS modules driven by ttspool's own batched loop.

`engine` loads the model and runs batches; `running_batch` holds the rows a batch is
generating (given the model as frozen `parts`, not the engine); `kv_cache`, `sampling` and
`cpu_linear` are its pieces; `assets` and `random_models` find or build the model files.
`requests` says what a row asks for and gets back, and imports no torch: the pipeline's
data modules name requests without loading the engine. This file imports nothing, so
that importing one submodule does not bring in the others.
"""
