"""Device meshes, partition-rule machinery and activation constraints, for any model.

The mesh has three named axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism whose
parameters and optimizer state are sharded too) and ``tensor`` (Megatron-style model parallelism).
The batch dimension of activations is split over ``data`` and ``fsdp`` together.

Where every array lives is decided by one ordered table of ``(regex, PartitionSpec)`` rules over
'/'-joined parameter paths (a model's table lives beside the model: ``easyppo.models.partitioning``):
the first rule that matches wins, and a parameter that no rule matches is an error naming its path,
never silently replicated. Optimizer state takes the spec of the parameter it mirrors, so one table
shards the whole train state. Parameters are born sharded (``sharded_init``): the initialiser runs
under ``jax.jit`` with output shardings, so no device ever holds a full-size copy of a model that
only fits when split.

Everything that can be checked without compiling is checked up front, with messages that name the
config key at fault: the mesh sizes against the device count (``make_mesh``) and batch sizes against
the batch axes (``check_batch_fits_mesh``). Nothing here knows a model's names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:
    import optax

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

PyTree = Any
PartitionRules = Sequence[tuple[str, P]]
MeshConfig = ml_collections.ConfigDict | Mapping[str, int]

# ``nn.scan`` over the decoder stack stores every leaf below ``.../layers/`` with an extra leading
# layer axis; rules describe one layer, so that axis is prepended, unsharded, to the rule's spec.
SCANNED_LAYERS_PATTERN = re.compile(r"(^|/)layers/")

# ---------------------------------------------------------------------------------------- the mesh


def default_config() -> ml_collections.ConfigDict:
    """Mesh sizes; lives at ``config.mesh`` in every training config.

    One size may be -1, meaning "all remaining devices". The default is pure FSDP over every device:
    parameters and optimizer state are split as finely as the devices allow, and no activation ever
    crosses devices inside a layer.
    """
    c = ml_collections.ConfigDict()
    c.data = 1  # replicas of the model, each on its own slice of the batch
    c.fsdp = -1  # devices over which parameters, optimizer state and the batch are split (-1: the rest)
    c.tensor = 1  # devices over which each layer's heads and hidden units are split
    return c


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes with a -1 resolved, checked against ``num_devices``."""
    sizes = []
    for axis in MESH_AXES:
        if axis not in cfg:
            raise ValueError(f"mesh.{axis} is missing from the mesh config (expected keys {MESH_AXES})")
        size = cfg[axis]
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{axis}={size!r} must be a positive integer or -1 (all remaining devices)")
        sizes.append(int(size))
    described = " * ".join(f"mesh.{axis}={size}" for axis, size in zip(MESH_AXES, sizes))
    wildcards = [axis for axis, size in zip(MESH_AXES, sizes) if size == -1]
    if len(wildcards) > 1:
        raise ValueError(f"only one mesh size may be -1, got {described}")
    known = math.prod(size for size in sizes if size != -1)
    if wildcards:
        if num_devices % known:
            raise ValueError(
                f"{described}: the fixed sizes multiply to {known}, which does not divide the "
                f"{num_devices} available devices, so mesh.{wildcards[0]}=-1 cannot be resolved"
            )
        sizes = [num_devices // known if size == -1 else size for size in sizes]
    elif known != num_devices:
        raise ValueError(
            f"{described} = {known}, but there are {num_devices} devices; make the product "
            f"{num_devices} or set one size to -1"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: every device of every process).

    The axes are ``Auto``: ``jax.make_mesh`` would otherwise create ``Explicit`` axes, on which the
    model's ``with_sharding_constraint`` calls fail.

    On a TPU slice the devices form a torus (4x4x4 chips on a v5p-128), and ``jax.make_mesh`` lays
    each mesh axis over whole physical axes; a size that is no product of them (``tensor=2`` there)
    has no such layout, and the mesh is laid out with a physical axis split instead (found by
    ``easyppo plan``: the pod would otherwise fail at start-up).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(cfg, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


# ----------------------------------------------------------------------------------------- rules


def path_to_str(path: jax.tree_util.KeyPath) -> str:
    """'/'-joined keys of a pytree path: ``model/layers_0/self_attn/q_proj/kernel``, ``0/mu/...``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _spec_for_path(name: str, shape: tuple[int, ...], rules: Sequence[tuple[re.Pattern, P]]) -> P:
    for pattern, spec in rules:  # noqa: B007 (spec is the matched rule's, used after the loop)
        if pattern.search(name):
            break
    else:
        raise ValueError(
            f"no partition rule matches parameter {name!r} (shape {shape}); add a (regex, PartitionSpec) "
            "entry for it to the rules"
        )
    if SCANNED_LAYERS_PATTERN.search(name):
        spec = P(None, *spec)
    if len(spec) > len(shape):
        raise ValueError(
            f"rule {pattern.pattern!r} gives parameter {name!r} the spec {spec}, which has more entries "
            f"than the parameter has dimensions (shape {shape})"
        )
    return spec


def partition_specs(tree: PyTree, rules: PartitionRules) -> PyTree:
    """The ``PartitionSpec`` of every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s), by rule.

    Each leaf's '/'-joined path is matched with ``re.search`` against the rules in order; the first
    match wins. Leaves under a scanned layer stack get an unsharded leading layer axis.
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _spec_for_path(path_to_str(path), _shape(leaf), compiled), tree
    )


def _check_divisible(name: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
    for dim, (size, entry) in enumerate(zip(shape, spec)):
        if entry is None:
            continue
        axes = entry if isinstance(entry, tuple) else (entry,)
        unknown = [axis for axis in axes if axis not in mesh.shape]
        if unknown:
            raise ValueError(f"{name!r} is sharded over {unknown}, which are not axes of the mesh {mesh.axis_names}")
        shards = math.prod(mesh.shape[axis] for axis in axes)
        if size % shards:
            raise ValueError(
                f"{name!r} has shape {shape}: dimension {dim} (size {size}) cannot be split over mesh "
                f"axes {axes} ({shards} shards) as its spec {spec} asks"
            )


def shardings_from_specs(tree: PyTree, specs: PyTree, mesh: Mesh) -> PyTree:
    """``NamedSharding``s for ``specs`` on ``mesh``, after checking each leaf of ``tree`` divides evenly."""

    def sharding(path, leaf, spec):
        _check_divisible(path_to_str(path), _shape(leaf), spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(sharding, tree, specs)


def named_shardings(tree: PyTree, mesh: Mesh, rules: PartitionRules) -> PyTree:
    """A ``NamedSharding`` on ``mesh`` for every leaf of ``tree``, by rule."""
    return shardings_from_specs(tree, partition_specs(tree, rules), mesh)


def shard_params(params: PyTree, mesh: Mesh, rules: PartitionRules) -> PyTree:
    """Places existing parameters (converted or host-loaded) on ``mesh`` as the rules say."""
    return jax.device_put(params, named_shardings(params, mesh, rules))


def sharded_init(init_fn: Callable[..., PyTree], *args: Any, mesh: Mesh, rules: PartitionRules) -> PyTree:
    """Runs ``init_fn(*args)`` so that its outputs are born sharded as the rules say.

    Shapes come from ``jax.eval_shape`` (nothing is computed), the shardings from the rules, and the
    initialiser then runs under ``jax.jit(out_shardings=...)``: each device computes only its own
    shards, so a model too large for one device can still be initialised. With JAX's partitionable
    threefry (the default), the values equal those of an unsharded init with the same key.
    """
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = named_shardings(abstract, mesh, rules)
        return jax.jit(init_fn, out_shardings=shardings)(*args)


# ------------------------------------------------------------------------------- optimizer state


def optimizer_state_specs(opt_state: PyTree, params: PyTree, rules: PartitionRules) -> PyTree:
    """Specs for an optax state (arrays or ``ShapeDtypeStruct``s) that mirror the parameters' specs.

    A state leaf whose path ends with a parameter's path and has that parameter's shape (Adam's
    ``0/mu/model/.../kernel``) takes that parameter's spec; a scalar leaf (a step count, an injected
    hyperparameter) is replicated. Anything else is an error naming the leaf, since guessing could
    silently replicate a parameter-sized buffer on every device.
    """
    param_leaves = jax.tree_util.tree_leaves_with_path(params)
    param_specs = jax.tree.leaves(partition_specs(params, rules))
    by_path = {path_to_str(path): (_shape(leaf), spec) for (path, leaf), spec in zip(param_leaves, param_specs)}

    def spec_for(path, leaf):
        name, shape = path_to_str(path), _shape(leaf)
        parts = name.split("/")
        for start in range(len(parts)):
            param_path = "/".join(parts[start:])
            if param_path in by_path:
                param_shape, spec = by_path[param_path]
                if param_shape == shape:
                    return spec
                raise ValueError(
                    f"optimizer state {name!r} mirrors parameter {param_path!r} but has shape {shape} "
                    f"instead of {param_shape}; its sharding cannot be derived from the parameter's rule"
                )
        if not shape:
            return P()
        raise ValueError(
            f"optimizer state {name!r} (shape {shape}) is neither a scalar nor a copy of a parameter, "
            "so no partition rule applies to it"
        )

    return jax.tree_util.tree_map_with_path(spec_for, opt_state)


def optimizer_state_shardings(
    optimizer: optax.GradientTransformation, params: PyTree, mesh: Mesh, rules: PartitionRules
) -> PyTree:
    """``NamedSharding``s for ``optimizer.init(params)``, from its shapes alone (``jax.eval_shape``)."""
    abstract = jax.eval_shape(optimizer.init, params)
    return shardings_from_specs(abstract, optimizer_state_specs(abstract, params, rules), mesh)


def sharded_optimizer_init(
    optimizer: optax.GradientTransformation, params: PyTree, *, mesh: Mesh, rules: PartitionRules
) -> PyTree:
    """``optimizer.init(params)`` with every state leaf born sharded like its parameter.

    Pass the same optax transform object that the train step uses: a new transform object gives a
    state tree that no longer matches shardings built from the old one.
    """
    shardings = optimizer_state_shardings(optimizer, params, mesh, rules)
    return jax.jit(optimizer.init, out_shardings=shardings)(params)


# ------------------------------------------------------------------------------------ batches


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the batch dimension is split: ``data * fsdp``."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` and ``fsdp``; every other dimension whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_fits_mesh(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    """Fails, naming the config key ``name``, unless ``batch_size`` splits evenly over the batch axes."""
    ways = batch_parallelism(mesh)
    if batch_size % ways:
        raise ValueError(
            f"{name}={batch_size} is not divisible by mesh.data * mesh.fsdp = "
            f"{mesh.shape['data']} * {mesh.shape['fsdp']} = {ways}"
        )


def host_local_to_global(batch: PyTree, mesh: Mesh) -> PyTree:
    """Assembles each process's rows into global arrays sharded over the batch axes.

    Every process passes its own slice of the global batch (same shapes on every host); leaf ``i`` of
    the result has ``process_count`` times as many rows. On one process this is a sharded
    ``device_put``.
    """
    sharding = batch_sharding(mesh)
    processes = jax.process_count()

    def to_global(path, local):
        name, shape = path_to_str(path), _shape(local)
        if not shape:
            raise ValueError(f"batch entry {name!r} is a scalar; every batch entry needs a batch dimension")
        check_batch_fits_mesh(shape[0] * processes, mesh, name=f"global rows of batch entry {name!r}")
        return jax.make_array_from_process_local_data(sharding, np.asarray(local))

    return jax.tree_util.tree_map_with_path(to_global, batch)


def global_rows(tree: PyTree, mesh: Mesh) -> PyTree:
    """Arrays sharded over the batch axes from *whole* host arrays that every process holds alike
    (e.g. rows gathered with ``process_allgather`` and then selected on every host the same way)."""
    sharding = batch_sharding(mesh)

    def place(value):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(place, tree)


# ------------------------------------------------------------------------------------- activations


def _current_mesh_shape() -> dict[str, int] | None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """Pins ``x`` to ``spec`` on the mesh set with ``jax.set_mesh``; a no-op without a mesh.

    Dimensions that the named axes do not divide are left unconstrained rather than failing, so the
    same model code serves a batch of one (decoding) and a full training batch.
    """
    axis_sizes = _current_mesh_shape()
    if axis_sizes is None:
        return x
    entries = []
    for dim, entry in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        names = tuple(n for n in names if n in axis_sizes)
        size = 1
        for n in names:
            size *= axis_sizes[n]
        entries.append(names if names and dim % size == 0 else None)
    return jax.lax.with_sharding_constraint(x, P(*entries))


# -------------------------------------------------------------------------------- abstract trees


def abstract_tree(tree: PyTree) -> PyTree:
    """``ShapeDtypeStruct``s (with shardings) of arrays or of ``ShapeDtypeStruct``s alike."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """The restore target of a state: each leaf's shape and dtype with the sharding it must have."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
