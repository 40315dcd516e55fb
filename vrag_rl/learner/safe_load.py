"""Checkpoints read without running code from them: a run directory may come from elsewhere.

Both checkpoint formats are pickles underneath, and a pickle can call anything. They are read here with only the
records each format writes allowed, so that a planted call is refused (``pickle.UnpicklingError``), never made:

- torch.distributed.checkpoint (the FSDP2 and single-process backend): ``.metadata`` is a plain pickle, which
  ``FileSystemReader`` loads with ``pickle.load``; ``MetadataReader`` loads it with an unpickler that knows only
  DCP's metadata records, ``torch.Size``, dtypes, layouts and ``pathlib`` paths. Tensors are read with
  ``torch.load(weights_only=True)`` by DCP itself; non-tensor values (the optimizer's hyperparameters), which DCP's
  ``DefaultLoadPlanner`` loads with ``weights_only=False``, are loaded by ``ValuesPlanner`` with ``weights_only=True``.
- DeepSpeed: ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``; ``WeightsOnlyEngine`` calls it
  with ``weights_only=True`` and allows the four DeepSpeed records its ZeRO optimizer state holds (a loss scaler, the
  stage enum, a fragment's address), which are plain data.
"""

from __future__ import annotations

import io
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_DCP_RECORDS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "StorageMeta",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name (torch.strided)
    "torch": {"Size"},
    "pathlib": {"PosixPath"},  # where the checkpoint was saved (StorageMeta.checkpoint_id)
}


class MetadataUnpickler(pickle.Unpickler):
    """Finds only DCP's metadata records (and dtypes); any other global is refused."""

    def find_class(self, module: str, name: str):
        if name in _DCP_RECORDS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata names {module}.{name}, which is not a record of torch.distributed.checkpoint: "
            "refused (a checkpoint does not call code)"
        )


class MetadataReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is unpickled by ``MetadataUnpickler``."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class ValuesPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` with non-tensor values loaded by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def deepspeed_records() -> list[type]:
    """The DeepSpeed classes a ZeRO-2/3 optimizer state file holds (plain data)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_engine(config):
    """DeepSpeed's checkpoint engine (``torch.save`` files) whose ``load`` is ``torch.load(weights_only=True)``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_records()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyEngine(config)
