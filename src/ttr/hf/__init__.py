"""transformers integration: `TTRConfig`, `TTRModel`, `TTRForCausalLM`, `TTRCache`.

Importing this module registers model_type "ttr" with AutoConfig, AutoModel and
AutoModelForCausalLM. `import ttr` does not import it (transformers takes seconds to import);
`import ttr.hf` does, or the attribute access `ttr.hf`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ttr.hf.cache import TTRCache
from ttr.hf.model import TTRConfig, TTRForCausalLM, TTRModel, TTRPreTrainedModel

AutoConfig.register("ttr", TTRConfig, exist_ok=True)
AutoModel.register(TTRConfig, TTRModel, exist_ok=True)
AutoModelForCausalLM.register(TTRConfig, TTRForCausalLM, exist_ok=True)

__all__ = ["TTRCache", "TTRConfig", "TTRForCausalLM", "TTRModel", "TTRPreTrainedModel"]
