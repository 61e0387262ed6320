"""Simulated federations: which data, modalities and budget each simulated client gets.

Everything is derived deterministically from the run config and the client's index, so a
ClientApp can rebuild its own partition in any process (and after a resume) without files.
The data is either the embedded synthetic dataset or a folder of site folders (one per client).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import RunConfig
from common.data import synthetic
from common.data.samples import MultimodalData, hide_modalities
from common.data.schema import DatasetSchema
from common.errors import ConfigError, DataError


@dataclass(frozen=True, eq=False)
class ClientPartition:
    """One simulated client: its id, its data (restricted to its modalities) and its budget."""

    client_id: str
    index: int
    group: int | None  # index into data.groups / dp.group-epsilon, when groups are used
    train: MultimodalData
    test: MultimodalData | None
    budget: float

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.train.schema.names


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _declared_splits(site: Path) -> list[str] | None:
    try:
        splits = json.loads((site / "schema.json").read_text()).get("splits", [])
        return [s for s in splits if isinstance(s, str)] if isinstance(splits, list) else None
    except (OSError, ValueError, AttributeError):
        return None  # let load_site report what is wrong with it


def _has_train_split(site: Path) -> bool:
    splits = _declared_splits(site)
    return True if splits is None else "train" in splits


def not_training(site: Path) -> str:
    """Why the site folder ``site`` takes no part in training ("" when it trains)."""
    splits = _declared_splits(site)
    from common.data.site_folders import TEST_SPLIT, TRAIN_SPLIT, split_hint

    if splits is None or TRAIN_SPLIT in splits:
        return ""
    hint = split_hint(splits)
    return (
        f"no '{TRAIN_SPLIT}' split (it declares {splits})"
        + (f"; {hint}" if hint else "")
        + (f"; its '{TEST_SPLIT}' samples can serve as server-side test data (data.server-test)" if TEST_SPLIT in splits else "")
    )


@functools.lru_cache(maxsize=4)
def _site_paths(folder: str) -> tuple[Path, ...]:
    """The training sites of a folder: one client per site that has a 'train' split."""
    from common.data.site_folders import site_folders

    paths = tuple(p for p in site_folders(folder) if _has_train_split(p))
    if not paths:
        raise DataError(
            f"data.dataset '{folder}' holds no site folders with a 'train' split (one folder per "
            "client; fedfuse trains on the samples whose split is 'train' and evaluates on 'test')"
        )
    return paths


def idle_sites(config: RunConfig) -> dict[str, str]:
    """Site folders of ``data.dataset`` that take no part in training, each with the reason (empty for synthetic)."""
    if config.data.synthetic:
        return {}
    from common.data.site_folders import site_folders

    return {p.name: why for p in site_folders(_dataset_folder(config)) if (why := not_training(p))}


def real_data_changes(config: RunConfig) -> list[str]:
    """What the run's simulation knobs change in real site data (empty: the sites' data is used as it is)."""
    data = config.data
    if data.synthetic:
        return []
    out = []
    if data.effective_assignment == "groups":
        out.append(
            f'data.assignment = "groups": site i keeps only the modalities of group i mod '
            f"{len(data.group_list)} of data.groups ({data.groups!r})"
        )
    elif data.effective_assignment == "dropout":
        out.append(
            f'data.assignment = "dropout": each site drops each of its modalities with probability '
            f"{data.modality_drop_prob:g} (data.modality-drop-prob)"
        )
    if data.effective_missing_rate > 0:
        out.append(
            f"data.missing-rate = {data.effective_missing_rate:g}: each present modality of each sample is "
            "hidden with this probability, in the sites' training and test splits"
        )
    return out


def heldout_sites(folder: str | Path) -> list[Path]:
    """Sites of a folder that hold only test samples (e.g. HAPT's test subjects): the server's test set."""
    from common.data.site_folders import site_folders

    sites = [p for p in site_folders(folder) if not _has_train_split(p)]
    if not sites:
        raise DataError(f"data.server-test '{folder}' holds no test-only site folders")
    return sites


def dataset_schema(config: RunConfig) -> DatasetSchema:
    """The schema of the whole federation: the union of every client's modalities."""
    if config.data.dataset == "synthetic":
        return synthetic.schema()
    from common.data.site_folders import federation_schema, load_site

    folder = _dataset_folder(config)
    return federation_schema([load_site(p) for p in _site_paths(folder)])


def federation_space(config: RunConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The head's modalities and labels: ``federation.*`` when set (deployments), else the dataset's."""
    fed = config.federation
    if fed.modalities or fed.labels:
        modalities = tuple(m.strip() for m in fed.modalities.split(",") if m.strip())
        labels = tuple(x.strip() for x in fed.labels.split(",") if x.strip())
        if not modalities or len(labels) < 2:
            raise ConfigError(
                "run config keys 'federation.modalities' and 'federation.labels' go together: name "
                'the head\'s modalities (e.g. "acc,gyro") and at least two labels'
            )
        return modalities, labels
    schema = dataset_schema(config)
    return schema.names, schema.labels


def _dataset_folder(config: RunConfig) -> str:
    folder = Path(config.data.dataset).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"run config key 'data.dataset': '{config.data.dataset}' is neither 'synthetic' nor an existing folder "
            "of site folders"
        )
    return str(folder.resolve())


def num_clients(config: RunConfig) -> int:
    """How many simulated clients the run config describes."""
    if config.data.dataset == "synthetic":
        return config.data.num_clients
    return len(_site_paths(_dataset_folder(config)))


def assigned_modalities(config: RunConfig, index: int, available: tuple[str, ...]) -> tuple[tuple[str, ...], int | None]:
    """The modalities client ``index`` holds (subset of ``available``) and its group, if any."""
    data = config.data
    assignment = data.effective_assignment
    if assignment == "all":
        return available, None
    if assignment == "groups":
        groups = data.group_list
        group = index % len(groups)
        unknown = [m for m in groups[group] if m not in dataset_schema(config)]
        if unknown:
            raise ConfigError(
                f"run config key 'data.groups': modalities {unknown} are not in the dataset "
                f"(it has {list(dataset_schema(config).names)})"
            )
        held = tuple(m for m in available if m in groups[group])
        if not held:
            raise DataError(f"client {index} is assigned {list(groups[group])} but its data has only {list(available)}")
        return held, group
    # dropout: each modality is missing with probability p, at least one kept (FedMultimodal)
    rng = np.random.default_rng(_seed(config.server.seed, index, 1))
    keep = rng.random(len(available)) >= data.modality_drop_prob
    if not keep.any():
        keep[rng.integers(len(available))] = True
    return tuple(m for m, k in zip(available, keep) if k), None


def _budget(config: RunConfig, group: int | None) -> float:
    budgets = config.dp.group_budgets
    if not budgets:
        return config.dp.epsilon
    if group is None:
        raise ConfigError("run config key 'dp.group-epsilon' needs data.assignment = 'groups' (or 'auto' on synthetic data)")
    if len(budgets) != len(config.data.group_list):
        raise ConfigError(f"run config key 'dp.group-epsilon': {len(budgets)} budgets for {len(config.data.group_list)} groups")
    return budgets[group]


def _with_missing(data: MultimodalData, rate: float, seed: int) -> MultimodalData:
    if rate <= 0:
        return data
    mask = hide_modalities(data.mask, rate, torch.Generator().manual_seed(seed))
    return MultimodalData(data.schema, data.inputs, mask, data.labels)


def _synthetic_raw(config: RunConfig, index: int) -> tuple[MultimodalData, MultimodalData | None]:
    data = config.data
    probs = None
    if data.dirichlet_alpha > 0:
        rng = np.random.default_rng(_seed(config.server.seed, index, 2))
        probs = torch.tensor(rng.dirichlet([data.dirichlet_alpha] * len(synthetic.LABELS)), dtype=torch.float32)
    pool = synthetic.generate(data.samples_per_client, seed=_seed(config.server.seed, index, 3), class_probs=probs)
    n_test = int(round(data.test_fraction * len(pool)))
    if n_test == 0:
        return pool, None
    return pool.subset(range(n_test, len(pool))), pool.subset(range(n_test))


def _site_raw(config: RunConfig, index: int) -> tuple[str, MultimodalData, MultimodalData | None]:
    from common.data.site_folders import load_site

    site = load_site(_site_paths(_dataset_folder(config))[index])
    train = site.part("train")
    if train is None:
        raise DataError(f"site '{site.name}' ({site.path}) has no 'train' samples to train on")
    return site.name, train, site.part("test")


def client_partition(config: RunConfig, index: int) -> ClientPartition:
    """The data, modalities and budget of simulated client ``index``."""
    total = num_clients(config)
    if not 0 <= index < total:
        raise ConfigError(f"client index {index} is outside the {total} clients of this scenario")
    if config.data.dataset == "synthetic":
        client_id, (train, test) = f"client-{index:02d}", _synthetic_raw(config, index)
    else:
        client_id, train, test = _site_raw(config, index)
    held, group = assigned_modalities(config, index, train.schema.names)
    rate = config.data.effective_missing_rate
    train = _with_missing(train.restrict(held), rate, _seed(config.server.seed, index, 4))
    if test is not None:
        test = _with_missing(test.restrict(held), rate, _seed(config.server.seed, index, 5))
    return ClientPartition(client_id, index, group, train, test, _budget(config, group))
