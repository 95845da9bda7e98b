package llama

import (
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
)

// CausalLMPrefill returns the first call of cached decoding: inputs[0] are token ids
// [batch, seq] int32 (seq ≤ maxLen), the start of every sequence. Its outputs are the logits
// [batch, seq, vocab] (CausalLM's), then the keys and values [layers, batch, length, kvHeads,
// headDim] of a cache with room for maxLen tokens, length = maxLen plus the positions the method
// adds to the inputs (prompt tuning's virtual tokens). The method's added positions, their
// tokens and positions past seq are CausalLMStep's to fill.
func CausalLMPrefill(cfg Config, maxLen int) peft.ModelFn {
	return func(ctx *context.Context, _ any, inputs []*graph.Node) []*graph.Node {
		ids := inputs[0]
		_, seq := idsShape(cfg, ids)
		if maxLen < seq {
			panic(fmt.Sprintf("llama.CausalLMPrefill: %d token ids do not fit a cache of %d", seq, maxLen))
		}
		return cachedDecoder(ctx, cfg, ids, nil, nil, nil, maxLen)
	}
}

// CausalLMStep returns the later calls of cached decoding: inputs[0] are the next token ids
// [batch, seq] int32, inputs[1] a scalar int32 start, the position of ids[:, 0] among the
// sequence's tokens (the number of tokens before them: those given to the prefill and earlier
// steps, padding excluded), inputs[2] and inputs[3] the keys and values of the cache returned by
// the call before. The outputs are the logits [batch, seq, vocab] of the ids and the updated keys
// and values, shaped as given. start + seq must stay within the cache's room; a start outside
// it writes nowhere and attends to stale entries (the graph cannot check a run-time value: the
// caller keeps count).
func CausalLMStep(cfg Config) peft.ModelFn {
	return func(ctx *context.Context, _ any, inputs []*graph.Node) []*graph.Node {
		if len(inputs) != 4 {
			panic(fmt.Sprintf("llama.CausalLMStep: want 4 inputs (ids, start, keys, values), got %d", len(inputs)))
		}
		ids, start, keys, values := inputs[0], inputs[1], inputs[2], inputs[3]
		batch, _ := idsShape(cfg, ids)
		want := []int{cfg.NumLayers, batch, keys.Shape().Dim(2), cfg.NumKVHeads, cfg.HeadDim()}
		if keys.Rank() != 5 || !keys.Shape().Equal(values.Shape()) || !keys.Shape().Equal(shapes.Make(dtypes.Float32, want...)) {
			panic(fmt.Sprintf("llama.CausalLMStep: keys %s and values %s must both be float32 %v [layers, batch, length, kvHeads, headDim]",
				keys.Shape(), values.Shape(), want))
		}
		if start.Rank() != 0 || !start.DType().IsInt() {
			panic(fmt.Sprintf("llama.CausalLMStep: start must be an integer scalar, got %s", start.Shape()))
		}
		return cachedDecoder(ctx, cfg, ids, start, keys, values, 0)
	}
}

// cachedDecoder runs the decoder on ids with a cache: a fresh one of room maxLen when keys is nil
// (the prefill), else the given one, continuing at start. It returns the logits and the updated
// keys and values.
func cachedDecoder(ctx *context.Context, cfg Config, ids, start, keys, values *graph.Node, maxLen int) []*graph.Node {
	g := ids.Graph()
	peft.SetTask(ctx, g, peft.TaskCausalLM)
	batch, seq := ids.Shape().Dim(0), ids.Shape().Dim(1)
	positions := graph.Iota(g, shapes.Make(dtypes.Int32, batch, seq), 1)
	if start != nil {
		positions = graph.Add(positions, graph.BroadcastToDims(graph.ConvertDType(start, dtypes.Int32), batch, seq))
	}
	in := embedInputs(ctx, cfg, ids, &peft.Inputs{
		Mask:      graph.Ones(g, shapes.Make(dtypes.Bool, batch, seq)),
		Positions: positions,
		MaxLength: cfg.MaxPositions,
		Cached:    start != nil,
	})
	length := maxLen + in.Embeddings.Shape().Dim(1) - seq // the method's added positions, too
	if keys != nil {
		length = keys.Shape().Dim(2)
	}
	if in.Past+length > cfg.MaxPositions {
		panic(fmt.Sprintf("llama: a cache of %d positions after %d of the method's exceeds max_position_embeddings %d",
			length, in.Past, cfg.MaxPositions))
	}
	cache := newKVCache(cfg, graph.AddScalar(in.Positions, float64(-in.Past)), length, keys, values)
	hidden := blocks(ctx, cfg, in, cachedBias(cfg, in.Positions, in.Past, length), cache)
	return []*graph.Node{lmHead(ctx, cfg, hidden), graph.Stack(cache.keys, 0), graph.Stack(cache.values, 0)}
}

// kvCache is the cache of every layer while the graph is built: each layer's update replaces its
// entries.
type kvCache struct {
	keys, values []*graph.Node // per layer [batch, length, kvHeads, headDim]; nil: all zero
	write        *graph.Node   // [batch, new, length] float32: one-hot of each new position's entry
	keep         *graph.Node   // [batch, length, 1, 1] float32: 1 where no new position is written
}

// newKVCache prepares writing the new positions at the entries index [batch, new] into the cache
// keys, values [layers, batch, length, kvHeads, headDim] (nil: a fresh cache of length entries).
func newKVCache(cfg Config, index *graph.Node, length int, keys, values *graph.Node) *kvCache {
	write := graph.OneHot(index, length, dtypes.Float32)
	written := graph.ReduceSum(write, 1) // [batch, length]
	keep := graph.OneMinus(written)
	batch := index.Shape().Dim(0)
	c := &kvCache{
		keys: make([]*graph.Node, cfg.NumLayers), values: make([]*graph.Node, cfg.NumLayers),
		write: write, keep: graph.Reshape(keep, batch, length, 1, 1),
	}
	if keys != nil {
		for l := range cfg.NumLayers {
			layer := func(x *graph.Node) *graph.Node {
				return graph.Reshape(graph.Slice(x, graph.AxisElem(l)), batch, length, cfg.NumKVHeads, cfg.HeadDim())
			}
			c.keys[l], c.values[l] = layer(keys), layer(values)
		}
	}
	return c
}

// update writes a layer's new keys and values [batch, new, kvHeads, headDim] into its entries and
// returns the layer's whole cache [batch, length, kvHeads, headDim].
func (c *kvCache) update(layer int, k, v *graph.Node) (*graph.Node, *graph.Node) {
	put := func(old, x *graph.Node) *graph.Node {
		written := graph.Einsum("bsm,bskd->bmkd", c.write, x)
		if old == nil {
			return written
		}
		return graph.Add(graph.Mul(old, c.keep), written)
	}
	c.keys[layer], c.values[layer] = put(c.keys[layer], k), put(c.values[layer], v)
	return c.keys[layer], c.values[layer]
}

// cachedBias is attentionBias for attention over a cache: a query at position p (positions
// [batch, new], the method's numbering) sees the past+length keys at positions 0…past+length−1
// (a method's past positions, then the cache entries) that are ≤ p and, with a sliding window,
// > p − window, as transformers masks a cache. Shaped [batch, kvHeads, group, new, past+length].
func cachedBias(cfg Config, positions *graph.Node, past, length int) *graph.Node {
	g := positions.Graph()
	batch, n := positions.Shape().Dim(0), positions.Shape().Dim(1)
	total := past + length
	keys := graph.Iota(g, shapes.Make(dtypes.Int32, batch, n, total), 2)
	queries := graph.BroadcastToDims(graph.Reshape(positions, batch, n, 1), batch, n, total)
	allowed := graph.LessOrEqual(keys, queries)
	if window := cfg.Family().SlidingWindow; window > 0 {
		allowed = graph.LogicalAnd(allowed, graph.GreaterThan(keys, graph.AddScalar(queries, float64(-window))))
	}
	zeros := graph.Zeros(g, shapes.Make(dtypes.Float32, batch, n, total))
	bias := graph.Where(allowed, zeros, graph.AddScalar(zeros, -1e9))
	group := cfg.NumHeads / cfg.NumKVHeads
	return graph.BroadcastToDims(graph.Reshape(bias, batch, 1, 1, n, total), batch, cfg.NumKVHeads, group, n, total)
}
