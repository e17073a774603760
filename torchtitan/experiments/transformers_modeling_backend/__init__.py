"""Train Hugging Face transformers models with torchtitan's parallelisms, registered as
`model.name = "transformers_modeling_backend"` with flavors "full" (the HF config as is) and "debugmodel"
(the same architecture shrunk to two small layers). The model comes from `[hf_transformers] model`."""

from torchtitan.components.dataloader import build_text_dataloader
from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.experiments.transformers_modeling_backend.infra.parallelize import parallelize_hf_transformers
from torchtitan.experiments.transformers_modeling_backend.infra.pipeline import pipeline_hf_transformers
from torchtitan.experiments.transformers_modeling_backend.model.args import (
    HFTransformerModelArgs,
    TitanDenseModelArgs,
)
from torchtitan.experiments.transformers_modeling_backend.model.model import HFTransformerModel
from torchtitan.experiments.transformers_modeling_backend.model.state_dict_adapter import (
    HFTransformerStateDictAdapter,
)
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

hf_transformers_args: dict[str, HFTransformerModelArgs] = {
    "full": HFTransformerModelArgs(titan_dense_args=TitanDenseModelArgs()),
    "debugmodel": HFTransformerModelArgs(
        titan_dense_args=TitanDenseModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, ffn_hidden_dim=768)
    ),
}

register_train_spec(
    "transformers_modeling_backend",
    TrainSpec(
        model_cls=HFTransformerModel,
        model_args=hf_transformers_args,
        parallelize_fn=parallelize_hf_transformers,
        pipelining_fn=pipeline_hf_transformers,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_text_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=None,
        state_dict_adapter=HFTransformerStateDictAdapter,
    ),
)
