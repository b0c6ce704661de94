from fedllm.cli import list_plugins
from fedllm.registry import ALL, Registry


def test_fedllm_list_shows_every_plugin_with_options_and_defaults():
    text = list_plugins()
    for registry in ALL.values():
        for name in registry.names():
            assert f"  {name}:" in text
    assert "mu: float = 0.01" in text and "tiny-llama" in text


def test_the_constructor_signature_is_the_option_schema():
    reg = Registry("widget")

    @reg.register("w")
    class Widget:
        """A widget."""

        def __init__(self, size: int, colour: str = "red"):
            self.size, self.colour = size, colour

    built = reg.build({"name": "w", "size": "3"})
    assert (built.size, built.colour) == (3, "red")
    assert [o.describe() for o in reg.options("w")] == ["size: int  (required)", "colour: str = 'red'"]
