"""The synthesis engine: ChatTTS modules driven by ttspool's own batched loop.

`engine` loads the model and runs batches; `running_batch` holds the rows a batch is
generating (given the model as frozen `parts`, not the engine); `kv_cache`, `sampling` and
`cpu_linear` are its pieces; `assets` and `random_models` find or build the model files.
"""

from .dtypes import pick_device, pick_dtype
from .engine import Engine
from .errors import EngineError
from .requests import Refill, SynthRequest, SynthResult

__all__ = ["Engine", "EngineError", "Refill", "SynthRequest", "SynthResult", "pick_device", "pick_dtype"]
