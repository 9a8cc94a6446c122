"""Per-example engines by name: the one list of engine names, above the engines themselves."""

from tfdp_prune import per_example
from tfdp_prune import per_layer

_ENGINES = {"vectorized": per_example.VectorizedEngine, "per_layer": per_layer.PerLayerEngine}


def get(engine) -> per_example.PerExampleEngine:
  """An engine instance from an instance, a name, or a `serialize`d dict."""
  if isinstance(engine, per_example.PerExampleEngine):
    return engine
  if isinstance(engine, dict) and engine.get("name") in _ENGINES:
    return _ENGINES[engine["name"]](**engine.get("config", {}))
  if isinstance(engine, str) and engine in _ENGINES:
    return _ENGINES[engine]()
  raise ValueError(f"Expected per_example_engine to be one of {sorted(_ENGINES)} or a "
                   f"PerExampleEngine. Received: per_example_engine={engine!r}.")


def serialize(engine: per_example.PerExampleEngine) -> dict:
  """{"name": ..., "config": ...} of a built-in engine (its exact class)."""
  for name, engine_class in _ENGINES.items():
    if type(engine) is engine_class:
      return {"name": name, "config": engine.get_config()}
  raise ValueError(f"Cannot serialize per-example engine {type(engine).__name__}: expected one "
                   f"of {sorted(_ENGINES)}.")
