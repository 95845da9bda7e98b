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
// [batch, seq] int32 (seq ≤ maxLen), the start of every sequence, and inputs[1], optional, the
// left padding of each row, pad [batch] int32: row b's first pad[b] ids are padding, its real
// tokens start at column pad[b] and are numbered from position 0 there (absent or all zero: no
// padding). Its outputs are the logits [batch, seq, vocab] (CausalLM's; those of padding columns
// are meaningless), then the keys and values [layers, batch, length, kvHeads, headDim] of a cache
// with room for maxLen tokens, length = maxLen plus the positions the method adds to the inputs
// (prompt tuning's virtual tokens). Padding is never written to the cache. The method's added
// positions, their tokens and positions past seq are CausalLMStep's to fill.
func CausalLMPrefill(cfg Config, maxLen int) peft.ModelFn {
	return func(ctx *context.Context, _ any, inputs []*graph.Node) []*graph.Node {
		if len(inputs) != 1 && len(inputs) != 2 {
			panic(fmt.Sprintf("llama.CausalLMPrefill: want 1 or 2 inputs (ids, optional pad), got %d", len(inputs)))
		}
		ids := inputs[0]
		batch, seq := idsShape(cfg, ids)
		if maxLen < seq {
			panic(fmt.Sprintf("llama.CausalLMPrefill: %d token ids do not fit a cache of %d", seq, maxLen))
		}
		var pad *graph.Node
		if len(inputs) == 2 {
			pad = padInput("llama.CausalLMPrefill", inputs[1], batch)
		}
		return cachedDecoder(ctx, cfg, ids, pad, nil, nil, nil, maxLen)
	}
}

// CausalLMStep returns the later calls of cached decoding: inputs[0] are the next token ids
// [batch, seq] int32, inputs[1] a scalar int32 start, the column of ids[:, 0] (the number of
// columns before them: those given to the prefill, its padding included, and to earlier steps),
// inputs[2] and inputs[3] the keys and values of the cache returned by the call before, and
// inputs[4], optional, the rows' left padding pad [batch] int32 as given to the prefill, so that
// row b's ids are at positions start−pad[b]… (absent: every row at start, no padding). The
// outputs are the logits [batch, seq, vocab] of the ids and the updated keys and values, shaped as
// given. start + seq must stay within the cache's room; a start outside it writes nowhere and
// attends to stale entries (the graph cannot check a run-time value: the caller keeps count).
func CausalLMStep(cfg Config) peft.ModelFn {
	return func(ctx *context.Context, _ any, inputs []*graph.Node) []*graph.Node {
		if len(inputs) != 4 && len(inputs) != 5 {
			panic(fmt.Sprintf("llama.CausalLMStep: want 4 or 5 inputs (ids, start, keys, values, optional pad), got %d", len(inputs)))
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
		var pad *graph.Node
		if len(inputs) == 5 {
			pad = padInput("llama.CausalLMStep", inputs[4], batch)
		}
		return cachedDecoder(ctx, cfg, ids, pad, start, keys, values, 0)
	}
}

// padInput checks the left padding input, integers [batch], and returns it as int32.
func padInput(fn string, pad *graph.Node, batch int) *graph.Node {
	if pad.Rank() != 1 || pad.Shape().Dim(0) != batch || !pad.DType().IsInt() {
		panic(fmt.Sprintf("%s: pad must be integers [batch=%d] (each row's left padding), got %s", fn, batch, pad.Shape()))
	}
	return graph.ConvertDType(pad, dtypes.Int32)
}

// cachedDecoder runs the decoder on ids with a cache: a fresh one of room maxLen when keys is nil
// (the prefill), else the given one, continuing at column start. pad (nil: none) is each row's
// left padding: a row's positions are its columns less its padding, and the columns before its
// padding ends (negative positions) are masked out and written nowhere. It returns the logits and
// the updated keys and values.
func cachedDecoder(ctx *context.Context, cfg Config, ids, pad, start, keys, values *graph.Node, maxLen int) []*graph.Node {
	g := ids.Graph()
	peft.SetTask(ctx, g, peft.TaskCausalLM)
	batch, seq := ids.Shape().Dim(0), ids.Shape().Dim(1)
	positions := graph.Iota(g, shapes.Make(dtypes.Int32, batch, seq), 1)
	if start != nil {
		positions = graph.Add(positions, graph.BroadcastToDims(graph.ConvertDType(start, dtypes.Int32), batch, seq))
	}
	mask := graph.Ones(g, shapes.Make(dtypes.Bool, batch, seq))
	if pad != nil {
		positions = graph.Sub(positions, graph.BroadcastToDims(graph.Reshape(pad, batch, 1), batch, seq))
		mask = graph.GreaterOrEqual(positions, graph.ZerosLike(positions))
	}
	in := embedInputs(ctx, cfg, ids, &peft.Inputs{
		Mask:      mask,
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
	index := graph.AddScalar(in.Positions, float64(-in.Past))
	if pad != nil { // padding writes nowhere: a one-hot of −1 is all zero
		index = graph.Where(in.Mask, index, graph.AddScalar(graph.ZerosLike(index), -1))
	}
	cache := newKVCache(cfg, index, length, keys, values)
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
