"""Stand-ins for the GPU side, so the runtime's and the export's own GPU code paths run on a CPU.

``fake_cuda(monkeypatch)`` swaps ``ferret_runtime.cuda``'s buffers for host memory and its streams for
``LazyStream``, whose work runs only when an event on it (or the stream) is synchronised, as late as a
real GPU may run it; kernel launches (``launch.get_module``) go to ``HostLpdModule``, which runs the
kernels' blocks on the CPU when the stream gets to them. ``FakeTRT`` is a stand-in ``tensorrt`` module
(builder, ONNX parser, timing cache, engine, execution context) and ``fake_plugin_api()`` a stand-in
``tensorrt.plugin``, whose engines run the graph in ONNX Runtime and the ferret::lpd plugin's kernel
through ``run_trt_entry``. What real CUDA and TensorRT do is the GPU tests' business.
"""

from __future__ import annotations

import inspect
import json
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ferret_export.onnx.graph import PLUGIN_DOMAIN
from ferret_export.onnx.model import describe_onnx
from ferret_export.tensorrt import plugin as trt_plugin
from ferret_runtime import cuda
from ferret_runtime.kernels import host, launch, nvrtc


def _driver_for_local_nvrtc() -> int:
    """A driver as new as the NVRTC installed here, as a working deployment has (the engine refuses
    plugin PTX from a newer NVRTC: tested on its own with an explicit older driver)."""
    try:
        major, minor = nvrtc.nvrtc_version()
    except cuda.CudaError:
        return 13000
    return major * 1000 + minor * 10


GPU = cuda.DeviceInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30, _driver_for_local_nvrtc())


class HostMemory:
    """ferret_runtime.cuda's buffers, in host memory."""

    def __init__(self, nbytes, context=None):
        self.nbytes, self._mem, self.closed = nbytes, np.zeros(nbytes, np.uint8), False

    @property
    def ptr(self):
        return self._mem.ctypes.data

    def array(self, dtype, shape):
        return self._mem[: int(np.prod(shape)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def close(self):
        self.closed = True


def fake_cuda(monkeypatch):
    import contextlib
    import ctypes

    class Ctx:
        closed = False

        def __init__(self, device=0):
            pass

        @contextlib.contextmanager
        def current(self):
            yield

        def close(self):
            self.closed = True

    def copy(dst, src, nbytes, stream):
        stream.enqueue(lambda: ctypes.memmove(dst.ptr, src.ptr, nbytes))

    for name, value in dict(device_info=lambda index=0: GPU, Context=Ctx, PinnedBuffer=HostMemory,
                            DeviceBuffer=HostMemory, Stream=LazyStream, Event=LazyEvent, copy_htod_async=copy,
                            copy_dtoh_async=copy).items():
        monkeypatch.setattr(cuda, name, value)
    module = HostLpdModule()
    monkeypatch.setattr(launch, "get_module", lambda device=0: module)
    return module


class HostLpdModule:
    """launch.LpdModule whose launches run the kernel's blocks on the CPU (host.emulate_*) when the stand-in
    stream gets to them: the launch tuple, pointers, sizes and stream order are the real ones."""

    arch = 90

    def __init__(self):
        self.launches = []

    def launch(self, cfg, args, stream=0):
        self.launches.append((cfg, args[2:]))
        LazyStream.by_handle[stream].enqueue(lambda: self._run(cfg, args))

    @staticmethod
    def _run(cfg, args):
        import ctypes

        image_ptr, out_ptr, n, h, w, *norm = args
        images = np.frombuffer((ctypes.c_uint8 * (n * h * w * 3)).from_address(image_ptr), np.uint8).reshape(n, h, w, 3)
        emulate = host.emulate_preprocess_lpd if cfg.name.startswith("preprocess_lpd") else host.emulate_normalize
        out = emulate(images, cfg, tuple(norm[:3]), tuple(norm[3:]))  # NaN where no block writes
        ctypes.memmove(out_ptr, out.ctypes.data, out.nbytes)


class LazyStream:
    """A stream whose work runs only when an event on it (or the stream) is synchronised, as late as a
    real GPU may run it: a slot reused before its logits were collected would be caught."""

    by_handle: dict = {}

    def __init__(self, ctx=None):
        self.ops, self.done, self.closed = [], 0, False
        self.handle = 1000 + len(LazyStream.by_handle)
        LazyStream.by_handle[self.handle] = self

    def enqueue(self, op):
        self.ops.append(op)

    def run_until(self, n):
        while self.done < n:
            self.ops[self.done]()
            self.done += 1

    def synchronize(self):
        self.run_until(len(self.ops))

    def close(self):
        self.closed = True


class LazyEvent:
    def __init__(self, ctx=None, timing=True):
        self.stream, self.mark, self.closed = None, 0, False

    def record(self, stream):
        self.stream, self.mark = stream, len(stream.ops)

    def synchronize(self):
        self.stream.run_until(self.mark)

    def close(self):
        self.closed = True


# ------------------------------------------------------------------------- TensorRT AOT plugin kernels
class KernelFault(RuntimeError):
    """What a real launch would report as a CUDA error (a missing symbol, an out-of-bounds access)."""


# The entry points of trt_plugin.TRT_ENTRY_SOURCE as TensorRT launches them, (inputs..., extra int32 arguments...,
# outputs...), and the lpd.cu kernel each forwards to, run by the host build's block emulator with (x, out, extra...).
# Written from the CUDA source, not from trt_plugin's Python: what aot_impl returns must fit these.
TRT_ENTRIES = {
    "trt_lpd_generic_f32": ("lpd_generic_emulate", ("N", "C", "H", "W", "k", "variant", "residual")),
    "trt_lpd_residual_f32": ("lpd_residual_emulate", ("N", "C", "H", "W")),
}


def run_trt_entry(name: str, ptx: bytes, x: np.ndarray, extra: list[int], grid: tuple[int, int, int],
                  block: tuple[int, int, int], shared_mem: int) -> np.ndarray:
    """Run the plugin kernel ``name`` as TensorRT would launch it from ``aot_impl``'s answer: looked up
    in the PTX the plugin embeds, given the extra arguments in the order returned, launched on the
    grid/block/shared memory returned. The output buffer starts as NaN (pixels no block writes)."""
    if f".entry {name}(" not in ptx.decode(errors="replace"):
        raise KernelFault(f"cuModuleGetFunction: named symbol {name!r} not found in the plugin's PTX")
    if name not in TRT_ENTRIES:  # e.g. lpd.cu's own kernels, which take the output second
        raise KernelFault(f"{name} is not a TensorRT entry point (inputs, extra int32 arguments, outputs) of the "
                          f"plugin's PTX; expected one of {sorted(TRT_ENTRIES)} (float32: the stand-in's only dtype)")
    emulator, params = TRT_ENTRIES[name]
    if len(extra) != len(params):
        raise KernelFault(f"{name}: received {len(extra)} extra arguments; the entry point takes {params}")
    if x.dtype != np.float32 or int(np.prod(extra[:4], dtype=np.int64)) != x.size:
        raise KernelFault(f"{name}: sizes {extra[:4]} do not fit the {x.dtype} input of shape {x.shape} "
                          "(an illegal memory access on a GPU)")
    x = np.ascontiguousarray(x)
    out = np.full_like(x, np.nan)
    ints = lambda v: np.asarray(v, dtype=np.int32)  # noqa: E731
    code = getattr(host.load_host_library(), emulator)(x, out, *map(int, extra), ints(grid), ints(block),
                                                        int(shared_mem))
    if code != 0:
        raise KernelFault(f"{name}: the kernel refused its launch ({emulator} returned {code})")
    return out


# ---------------------------------------------------------------- TensorRT: sizes and tensorrt.plugin
class Sym:
    """A symbolic size: only +, *, // and the plugin API's cdiv/min, as on TensorRT's expressions;
    comparisons, bool() and int() raise, so Python's min() or an ``if`` on a size would fail here."""

    def __init__(self, value: int, text: str):
        self.value, self.text = value, text

    def _op(self, other, op, sym):
        o = other.value if isinstance(other, Sym) else other
        return Sym(op(self.value, o), f"({self.text} {sym} {getattr(other, 'text', other)})")

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b, "+")

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b, "*")

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b, "//")

    def _refuse(self, *_):
        raise TypeError(f"symbolic size {self.text} used as a concrete value")

    __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __int__ = __index__ = _refuse


def cdiv(a, b):
    return Sym(-(-a.value // b), f"cdiv({a.text}, {b})") if isinstance(a, Sym) else -(-a // b)


def sym_min(a, b):
    return Sym(min(a.value, b), f"min({a.text}, {b})") if isinstance(a, Sym) else min(a, b)


def value_of(v):
    return v.value if isinstance(v, Sym) else v


def fake_plugin_api():
    """A stand-in for tensorrt.plugin with the rules its decorators check (real classes as annotations,
    the aot_impl schema) and the objects aot_impl returns."""
    api = types.ModuleType("tensorrt.plugin")
    api.registry = {}

    class TensorDesc:
        def __init__(self, shape, dtype):
            self.shape_expr, self.dtype, self.ndim = tuple(shape), dtype, len(shape)

        def like(self):
            return TensorDesc(self.shape_expr, self.dtype)

    class SymInt32:
        def __init__(self, v):
            self.v = v

    class SymIntExprs(tuple):
        @classmethod
        def from_tuple(cls, items):
            return cls(items)

    class KernelLaunchParams:
        pass

    class AutoTuneCombination:
        def __init__(self, types_, layouts=""):
            self.types, self.layouts = types_, layouts

    api.TensorDesc, api.SymInt32, api.SymIntExprs = TensorDesc, SymInt32, SymIntExprs
    api.KernelLaunchParams, api.AutoTuneCombination = KernelLaunchParams, AutoTuneCombination
    api.cdiv, api.min = cdiv, sym_min
    api.op = types.SimpleNamespace()

    def decorator(kind):
        def wrap(plugin_id):
            def record(fn):
                params = inspect.signature(fn).parameters
                for p in params.values():  # tensorrt.plugin calls issubclass() on these
                    assert not isinstance(p.annotation, str), f"{kind} {p.name}: string annotation {p.annotation!r}"
                if kind == "register":
                    assert plugin_id not in api.registry, f"{plugin_id} registered twice"
                    ns, name = plugin_id.split("::")
                    setattr(api.op, ns, getattr(api.op, ns, types.SimpleNamespace()))
                    setattr(getattr(api.op, ns), name, fn)
                api.registry.setdefault(plugin_id, {})[kind] = fn
                return fn
            return record
        return wrap

    api.register, api.autotune, api.aot_impl = decorator("register"), decorator("autotune"), decorator("aot_impl")
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.float32, trt.float16, trt.plugin = "10.9.0.34", "FLOAT", "HALF", api
    return trt, api


# ------------------------------------------------------------ TensorRT: builder, engine, context
# The build's and the runtime's own code paths, run on a CPU: a stand-in `tensorrt` and a stand-in
# `ferret_runtime.cuda` whose memory is host memory. What the real TensorRT does is the GPU tests' business;
# the tests that use these check the calls, the files and the failures. The stand-in engine must not run
# what verify_engine compares against (the graph made portable, in an optimised ONNX Runtime session), or
# verification could not fail: standard operators run in an ONNX Runtime session with every graph
# optimisation off (so its fused and constant-folded paths are not shared with the reference), and a
# ferret::lpd node runs the plugin that was registered: the launch its aot_impl returns, through the host
# build of lpd.cu's kernels (run_trt_entry above), so a plugin that computes something else fails the build.
TIMING_CACHE_HEADER = b"stand-in timing cache for TensorRT 10.9.0.34 on %s\n" % GPU.name.encode()


class FakeTRT(types.ModuleType):
    def __init__(self, version="10.9.0.34", error=0.0, plugin_api=None):
        super().__init__("tensorrt")
        self.__version__, self.error, self.calls, self.builds = version, error, [], []
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0, PREFER_AOT_PYTHON_PLUGINS=1)
        self.BuilderFlag = types.SimpleNamespace(TF32="TF32")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.HardwareCompatibilityLevel = types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS")
        self.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        self.float16, self.float32 = "HALF", "FLOAT"
        fake = self

        class ILogger:
            Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

            def __init__(self):
                pass

        class Logger(ILogger):
            WARNING, VERBOSE = 2, 4

            def __init__(self, level=2):
                pass

        class Cache:
            """A timing cache: a header naming the GPU and TensorRT it was measured on, then one line per
            (network, shapes) the builder timed; a build adds its line unless the cache already has it."""

            def __init__(self, data):
                self.loaded = bytes(data)  # what create_timing_cache was given
                self.lines = self.loaded.splitlines(keepends=True)[1:] if self.loaded else []

            def matches(self):
                return not self.loaded or self.loaded.startswith(TIMING_CACHE_HEADER)

            def serialize(self):
                return TIMING_CACHE_HEADER + b"".join(self.lines)

        class Config:
            def __init__(self):
                self.flags_cleared, self.pool, self.level, self.cache, self.profiles = [], None, None, None, []

            def set_memory_pool_limit(self, kind, size):
                self.pool = (kind, size)

            def clear_flag(self, flag):
                self.flags_cleared.append(flag)

            def create_timing_cache(self, data):
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                if not (cache.matches() or ignore_mismatch):
                    return False  # as TensorRT: a cache from another GPU or version is refused
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, p):
                self.profiles.append(p)

        class OptProfile(dict):
            def set_shape(self, name, lo, opt, hi):
                self[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Network:
            def __init__(self, flags):
                self.flags, self.onnx = flags, None

        class OnnxParser:
            """Parses the file; a custom-domain node needs a plugin registered under namespace::op_type."""

            def __init__(self, network, logger):
                self.network, self.errors = network, []

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

            def parse_from_file(self, path):
                registry = getattr(getattr(fake, "plugin", None), "registry", {})
                for node in onnx.load(path, load_external_data=False).graph.node:
                    if node.domain in ("", "ai.onnx"):
                        continue
                    ns = {a.name: a.s.decode() for a in node.attribute if a.name == "plugin_namespace"}
                    plugin_id = f"{ns.get('plugin_namespace', node.domain)}::{node.op_type}"
                    if plugin_id not in registry:
                        self.errors.append(f"node {node.name}: plugin {plugin_id} not found in the registry")
                self.network.onnx = path
                return not self.errors

        class Builder:
            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                fake.config = Config()
                return fake.config

            def create_optimization_profile(self):
                return OptProfile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", network.flags))
                (name, shapes), = config.profiles[0].items()
                cache = config.cache
                fake.builds.append({"onnx": Path(network.onnx).name,
                                    "timing_cache_in": None if cache is None else cache.loaded})
                if cache is not None:  # the timings measured here go into the cache the config holds
                    line = f"{Path(network.onnx).name} {shapes}\n".encode()
                    if line not in cache.lines:
                        cache.lines.append(line)
                return json.dumps({"onnx": network.onnx, "input": name, "profile": shapes}).encode()

        self.ILogger, self.Logger, self.Builder, self.OnnxParser = ILogger, Logger, Builder, OnnxParser
        self.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda blob: FakeEngine(fake, blob))
        if plugin_api is not None:
            self.plugin = plugin_api

    @staticmethod
    def nptype(dtype):
        return {"FLOAT": np.float32, "HALF": np.float16, "UINT8": np.uint8}[dtype]

    def run_plugin(self, plugin_id, attrs, x):
        """The registered plugin on ``x``: its output description and its AOT launch (asked for each shape
        run; TensorRT asks once, symbolically, at build time: same values), run by the host kernels."""
        api = self.plugin
        fns = api.registry[plugin_id]
        desc = api.TensorDesc(tuple(Sym(v, d) for v, d in zip(x.shape, "NCHW")),
                              {np.dtype(np.float32): self.float32, np.dtype(np.float16): self.float16}[x.dtype])
        out = fns["register"](desc, *attrs)
        name, ptx, params, extra = fns["aot_impl"](desc, *attrs, (out,), 0)
        grid = tuple(value_of(getattr(params, f"grid_{a}")) for a in "xyz")
        block = tuple(getattr(params, f"block_{a}") for a in "xyz")
        return run_trt_entry(name, ptx, x, [value_of(e.v) for e in extra], grid, block, params.shared_mem)


def _unoptimized_session(proto):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _up_to(proto, name):
    """The graph that computes tensor ``name`` from the graph's inputs: the nodes it depends on, as outputs ``name``."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    producer = {o: n for n in proto.graph.node for o in n.output}
    keep, todo = set(), [name]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            todo += list(n.input)
    del out.graph.node[:]
    out.graph.node.extend(n for n in proto.graph.node if id(n) in keep)
    used = {i for n in out.graph.node for i in n.input}
    del out.graph.input[:]
    out.graph.input.extend(v for v in proto.graph.input if v.name in used)
    del out.graph.output[:]
    out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


def cut_at_plugin(path: Path) -> tuple[onnx.ModelProto, str]:
    """The plugin graph with its ferret::lpd node removed and the node's output made a graph input."""
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.domain == PLUGIN_DOMAIN)
    proto.graph.node.remove(node)
    proto.graph.input.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT,
                                                                [None, 3, None, None]))
    keep = [o for o in proto.opset_import if o.domain != PLUGIN_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return proto, node.output[0]


class FakeEngine:
    """The graph as built: standard operators in ONNX Runtime (no graph optimisation), the ferret::lpd node
    by the registered plugin's kernel (FakeTRT.run_plugin), with the graph cut around that node."""

    def __init__(self, trt, blob):
        spec = json.loads(blob)
        self.trt, self.profile = trt, [tuple(s) for s in spec["profile"]]
        model = describe_onnx(spec["onnx"])
        self.names = (model.input_name, model.output_name)
        self.dtypes = {model.input_name: {"float32": "FLOAT", "uint8": "UINT8"}[model.input_dtype],
                       model.output_name: "FLOAT"}
        self.num_io_tensors = 2
        proto = onnx.load(spec["onnx"])
        custom = [n for n in proto.graph.node if n.domain not in ("", "ai.onnx")]
        self.plugin = None
        if not custom:
            self.session = _unoptimized_session(proto)
            return
        (node,) = custom  # the exports have one ferret::lpd node
        control = trt_plugin.PLUGIN_CONTROL_ATTRS  # the parser keeps these; the rest go to the plugin in node order
        attrs = [onnx.helper.get_attribute_value(a) for a in node.attribute if a.name not in control]
        attrs = [a.decode() if isinstance(a, bytes) else a for a in attrs]
        namespace = next((a.s.decode() for a in node.attribute if a.name == "plugin_namespace"), node.domain)
        cut, _ = cut_at_plugin(Path(spec["onnx"]))
        self.plugin = (f"{namespace}::{node.op_type}", attrs, node.input[0], node.output[0])
        self.pre = None if node.input[0] == model.input_name else _unoptimized_session(_up_to(cut, node.input[0]))
        self.session = _unoptimized_session(cut)

    def run(self, x):
        if self.plugin is None:
            return self.session.run(None, {self.names[0]: x})[0]
        plugin_id, attrs, src, dst = self.plugin
        plugin_in = x if self.pre is None else self.pre.run(None, {self.names[0]: x})[0]
        plugin_out = self.trt.run_plugin(plugin_id, attrs, plugin_in)
        return self.session.run(None, {self.names[0]: x, dst: plugin_out})[0]

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "INPUT" if name == self.names[0] else "OUTPUT"

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, index):
        return self.profile

    def get_tensor_shape(self, name):
        return (-1, 3, -1, -1) if name == self.names[0] else (-1, 1)

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.addresses, self.shape = engine, {}, None

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return True

    def execute_async_v3(self, stream):
        shape = self.shape
        LazyStream.by_handle[stream].enqueue(lambda: self._execute(shape))
        return True

    def _execute(self, shape):
        import ctypes

        self.shape = shape
        e = self.engine
        dtype = np.dtype(e.trt.nptype(e.dtypes[e.names[0]]))
        count = int(np.prod(self.shape))
        raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(self.addresses[e.names[0]])
        x = np.frombuffer(raw, dtype).reshape(self.shape)
        y = e.run(x).astype(np.float32) + e.trt.error
        ctypes.memmove(self.addresses[e.names[1]], y.ctypes.data, y.nbytes)
        return True
