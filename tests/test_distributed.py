from sppo_lightning.distributed import DistContext, rank_batches


def test_rank_batches_split_and_lockstep():
    assert rank_batches(5, 0, 2) == [(0, True), (2, True), (4, True)]
    assert rank_batches(5, 1, 2) == [(1, True), (3, True)]
    # sharded model: every rank runs 3 steps; rank 1 repeats its last batch and drops the output
    assert rank_batches(5, 1, 2, lockstep=True) == [(1, True), (3, True), (3, False)]
    assert rank_batches(1, 1, 2, lockstep=True) == [(0, False)]
    assert rank_batches(0, 0, 2, lockstep=True) == []
    assert rank_batches(3, 0, 1) == [(0, True), (1, True), (2, True)]


def test_a_single_process_context_needs_no_strategy():
    ctx = DistContext()
    assert ctx.is_global_zero and ctx.broadcast("x") == "x" and ctx.all_gather_object(3) == [3]
    ctx.barrier("nothing to wait for")
