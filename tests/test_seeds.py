"""fedllm.seeds must reproduce, bit for bit, every seed the code derived before it existed:
resumed runs and stored adapters depend on it. The numbers below were computed with the
old per-site code (client_seed, privacy's `seeded`, Ferret's generator_seed and pool,
FFA-LoRA's module_generator, framing.rng with the codecs' salts, the samplers', attacks',
FedAMD's and data preparation's default_rng entropy lists) before the refactor."""
import numpy as np
import pytest

from fedllm.seeds import derive


def draws(sequence) -> list[int]:
    # how the numpy streams are consumed: a Generator built from the derived sequence
    return np.random.default_rng(sequence).integers(2**63, size=2).tolist()


def pool(sequence, k: int = 3) -> list[int]:
    # Ferret's K seeds: 63-bit words of the pool's sequence
    return [int(w >> np.uint64(1)) for w in sequence.generate_state(k, np.uint64)]


AS_INT = {  # tag -> [((seed, *path), value)]
    "client": [  # client.client_seed(seed, round, client_id)
        ((0, 0, 0), 7896617691693857887), ((0, 3, 7), 6812392217526899882),
        ((1234, 19, 99), 6329014505542627673), ((2**40 + 5, 2, 1), 8708763276440671413),
    ],
    "ferret": [  # ferret.projections.generator_seed(seed, block)
        ((0, 0), 8053696072948187364), ((5, 3), 7114932516855849423),
        ((2**62 + 11, 17), 8818021942653781874), ((123456789, 0), 4929888404608419750),
    ],
    "ffa-lora": [  # ffa_lora.module_generator(seed, module).initial_seed(); WaRA prefixes "wara:"
        ((0, "model.layers.0.self_attn.q_proj"), 2037560566127047674), ((42, "q"), 5095024390012148216),
        ((7, "wara:model.layers.1.mlp.down_proj"), 7632630237806972716),
        ((7, "wara", "model.layers.1.mlp.down_proj"), 7632630237806972716),
    ],
    "dp-sgd": [  # privacy.budget.seeded(noise_seed, round, client_id, 0x5D)
        ((7, 0, 0), 6008812299145398079), ((7, 3, -1), 5242754068905170736), ((1234, 2, 5), 6108633425197765813),
    ],
    "dp-fedavg": [  # seeded(noise_seed, 0xD9)
        ((0,), 7665642539759447912), ((1234,), 3935110540294230694), ((-3,), 1774574723799984030),
    ],
    "dp-brem": [((0,), 7139970255382745074), ((1234,), 8269010953211150176)],  # seeded(noise_seed, 0xB3E)
    "poison": [((0, 0), 0), ((1234, 3), 1237)],  # engine: recipe.seed + client_id
}

AS_GENERATOR = {  # tag -> [((seed, *path), first two integers(2**63) draws)]
    "qsgd": [  # framing.rng(WireContext(round, client, seed), 0x05D); the path holds client + 1
        ((0, 0, 0), [3227755410665207927, 100234868130401695]),
        ((0, 1, 1), [1194061577004197566, 7434870440357564839]),
        ((1234, 5, 10), [4710172619090941557, 1483882080868618914]),
    ],
    "rqm": [  # framing.rng(..., 0x2D3)
        ((0, 0, 0), [1998833363399130364, 1869394248746274454]),
        ((0, 1, 1), [6758845077929495528, 8419759201499274464]),
        ((1234, 5, 10), [7044014916540819888, 9003764818383602154]),
    ],
    "sampler": [  # samplers.round_rng(seed, round)
        ((0, 0), [5874934615388537135, 2488343231644625808]),
        ((0, 4), [8144900997415551777, 2108395256860064410]),
        ((1234, 9), [5350721856433060169, 6690003743127191197]),
    ],
    "fedamd-anchor": [  # fedamd.is_anchor: default_rng([seed, round, client_id, 0xA4C])
        ((7, 0, 0), [5711419264827840113, 889253591941068819]),
        ((7, 3, 9), [8962825685997488853, 2387879275664117835]),
    ],
    "byzantine": [  # attacks.Attack.choose: default_rng([seed, 0xB1])
        ((0,), [7775361539250123318, 6857578847022135893]), ((1234,), [1240009028670682259, 2927314645714071709]),
    ],
    "label-flip": [  # attacks.LabelFlip.poison_data: default_rng([seed, 0x1F])
        ((0,), [1216591364803518211, 2998479597449086809]), ((3,), [3331017599070471698, 6709013360521816397]),
        ((1237,), [6522140838833799601, 4650001161084301335]),
    ],
    "data-sample": [  # data.prepare: take_sample(..., (seed, SAMPLE_STREAM=1))
        ((0,), [8206391887579712274, 5138691512939900390]), ((1234,), [1351103128658075865, 3694387475829114307]),
    ],
    "eval-split": [  # data.prepare._hold_out: default_rng((seed, EVAL_STREAM=2))
        ((0,), [745470182815633045, 3711833477247231940]), ((1234,), [7732543175282724031, 4713629658443565436]),
    ],
    "ferret-subset": [  # Ferret.chosen: default_rng([seed, round, client_id, g, SEED_TAG])
        ((0, 0, 0, 0), [3490171671353702678, 3851673221715401302]),
        ((1234, 2, 5, 3), [2850342910324095764, 5460051230248163567]),
    ],
}

FERRET_POOL = [  # Ferret.pool: SeedSequence(entropy + [SEED_TAG]).generate_state(K, uint64) >> 1
    ((0, 1, 2), [4237717260001284578, 1026768797466930362, 7503767327848086536]),  # per_client
    ((0, 1), [2144845628422018760, 1058153253134011406, 5552879859943265850]),  # per_round
    ((1234,), [3510310847266396025, 2574006964376051792, 3975103080245882143]),  # shared
]


@pytest.mark.parametrize("tag,args,want", [(t, a, w) for t, rows in AS_INT.items() for a, w in rows])
def test_int_streams_are_unchanged(tag, args, want):
    got = derive(*args, tag=tag)
    assert type(got) is int and got == want


@pytest.mark.parametrize("tag,args,want", [(t, a, w) for t, rows in AS_GENERATOR.items() for a, w in rows])
def test_numpy_streams_are_unchanged(tag, args, want):
    assert draws(derive(*args, tag=tag)) == want


@pytest.mark.parametrize("args,want", FERRET_POOL)
def test_ferret_pool_is_unchanged(args, want):
    assert pool(derive(*args, tag="ferret-pool")) == want


def test_hashed_streams_fit_int64():
    # torch.Generator.manual_seed takes 64 bits, the wire's int64 63 ("poison" is a plain sum)
    for tag in set(AS_INT) - {"poison"}:
        for args, _ in AS_INT[tag]:
            assert 0 <= derive(*args, tag=tag) < 2**63


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ValueError, match="client.*ferret"):
        derive(0, 1, tag="no-such-stream")


def test_call_sites_draw_what_they_drew():
    # the same numbers through the public callers (old code's output), not only through derive
    from fedllm.adapters.ffa_lora import module_generator
    from fedllm.attacks import Attack
    from fedllm.samplers import Uniform
    from fedllm.strategies.fedamd import is_anchor

    assert Uniform().sample(3, 20, 5, 1234) == [1, 2, 10, 11, 13] and Uniform().sample(0, 10, 3, 0) == [5, 6, 9]
    assert Attack(3).choose(20, 1234) == {2, 5, 10}
    anchors = "".join("1" if is_anchor(0.3, 7, r, c) else "0" for r in range(6) for c in range(6))
    assert anchors == "000100000001100011000100000100100000"
    assert module_generator(7, "q").initial_seed() == 945797983437958152


def test_seeds_is_bottom_layer():
    # beside wire.py and state.py: importable from every layer, so it imports nothing of ours
    import ast
    import fedllm.seeds

    tree = ast.parse(open(fedllm.seeds.__file__).read())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] == "fedllm"]
