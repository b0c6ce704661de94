"""How a round's clients split over the client groups (with G = 1, over the ranks): the
round ends when the slowest group ends, so the split evens out the groups' work. A pure
function of the clients and their planned costs, so every rank computes the same split
without talking, and a resume repeats it."""
from __future__ import annotations


def split_by_cost(clients: list[int], costs: list[float], parts: int) -> list[list[int]]:
    """`clients` over `parts` groups: longest-processing-time first (clients by decreasing
    cost, each to the least-loaded group; ties to the lower client id and group index) under
    a count cap, so every group trains ⌊k/parts⌋ or ⌈k/parts⌉ of the k clients as a
    round-robin split does: a local step's fixed cost (optimizer, hooks, Python) counts per
    client, not per token, and equal counts keep it even. Each group's clients in id order."""
    if len(clients) != len(costs):
        raise ValueError(f"{len(clients)} clients but {len(costs)} costs")
    floor, extra = divmod(len(clients), parts)
    load, members = [0.0] * parts, [[] for _ in range(parts)]
    for cost, client in sorted(zip(costs, clients), key=lambda pair: (-pair[0], pair[1])):
        open_ = [p for p in range(parts) if len(members[p]) < floor or (len(members[p]) == floor and extra > 0)]
        part = min(open_, key=lambda p: (load[p], p))
        extra -= len(members[part]) == floor
        members[part].append(client)
        load[part] += cost
    return [sorted(m) for m in members]
