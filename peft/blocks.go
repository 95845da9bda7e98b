package peft

import (
	"fmt"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
)

// graphParamActive is the graph parameter under which a Model puts the active method for the
// graph being built. A graph parameter (not a context parameter) is per graph, visible in every
// sub-scope and never written to checkpoints.
const graphParamActive = "peft_active_method"

// active is what the building blocks find in the graph parameter: the method, and while NewModel
// traces the layout, the layout being recorded.
type active struct {
	method Method
	trace  *Layout
}

func activeFor(ctx *context.Context, g *graph.Graph) *active {
	value, found := ctx.GetGraphParam(g, graphParamActive)
	if !found {
		return nil
	}
	a, _ := value.(*active)
	return a
}

// Linear is a linear layer y = x·W + b that fine-tuning methods can attach to. Its variables are
// named like GoMLX's layers.Dense (ctx.In("dense"), "weights" [in, out], "biases" [out]), so a
// model can swap layers.Dense for it without changing its checkpoints.
//
// x is shaped [..., in]; the result is [..., outDim]. ctx's scope names the layer: call it as
// Linear(ctx.In("q_proj"), …).
func Linear(ctx *context.Context, x *graph.Node, outDim int, useBias bool) *graph.Node {
	return linear(ctx, x, outDim, useBias, false)
}

// OutputHead is a Linear layer marked as an output head (language-model head or classifier).
// "all-linear" targeting skips heads, as Hugging Face PEFT does.
func OutputHead(ctx *context.Context, x *graph.Node, outDim int, useBias bool) *graph.Node {
	return linear(ctx, x, outDim, useBias, true)
}

func linear(ctx *context.Context, x *graph.Node, outDim int, useBias, head bool) *graph.Node {
	g := x.Graph()
	if x.Rank() < 1 {
		panic(fmt.Sprintf("peft.Linear %q: input must have rank ≥ 1, got %s", ctx.Scope(), x.Shape()))
	}
	inDim := x.Shape().Dim(-1)
	dense := ctx.In("dense").Checked(false)
	dense.VariableWithShape("weights", shapes.Make(x.DType(), inDim, outDim))
	if useBias {
		dense.WithInitializer(zeroInitializer).VariableWithShape("biases", shapes.Make(x.DType(), outDim))
	}
	layer := &LinearLayer{
		Path:    ScopeToPath(ctx.Scope()),
		Scope:   ctx.Scope(),
		In:      inDim,
		Out:     outDim,
		UseBias: useBias,
		Head:    head,
		Layer:   LayerIndex(ctx.Scope()),
	}
	a := activeFor(ctx, g)
	if a != nil && a.trace != nil {
		a.trace.Linears = append(a.trace.Linears, layer)
		a.trace.countLayer(layer.Layer)
	}
	if a != nil && a.method != nil {
		if hook, ok := a.method.(LinearHook); ok {
			return hook.Linear(ctx, layer, x)
		}
	}
	return layer.Base(ctx, x)
}

func zeroInitializer(g *graph.Graph, shape shapes.Shape) *graph.Node {
	return graph.Zeros(g, shape)
}

// Embedding looks up token ids (any integer shape [...]) in a table [vocab, dim] stored as the
// variable "embeddings" in ctx's scope, giving [..., dim].
func Embedding(ctx *context.Context, ids *graph.Node, vocab, dim int, dtype dtypes.DType) *graph.Node {
	g := ids.Graph()
	table := ctx.Checked(false).VariableWithShape("embeddings", shapes.Make(dtype, vocab, dim))
	if a := activeFor(ctx, g); a != nil && a.trace != nil {
		a.trace.Embeddings = append(a.trace.Embeddings, &EmbeddingSite{
			Path: ScopeToPath(ctx.Scope()), Scope: ctx.Scope(), Vocab: vocab, Dim: dim})
	}
	return graph.Gather(table.ValueGraph(g), graph.ExpandAxes(ids, -1))
}

// SubBlock runs one transformer sub-block, fn, on input and gives methods the chance to change
// its output (adapters). Call it with ctx scoped to the sub-block (ctx.In("mlp")). It returns what
// the residual connection should add to the stream.
func SubBlock(ctx *context.Context, kind SubBlockKind, input *graph.Node, fn func(*graph.Node) *graph.Node) *graph.Node {
	output := fn(input)
	a := activeFor(ctx, input.Graph())
	if a == nil {
		return output
	}
	site := &SubBlockSite{
		Path:  ScopeToPath(ctx.Scope()),
		Scope: ctx.Scope(),
		Kind:  kind,
		Layer: LayerIndex(ctx.Scope()),
		Dim:   output.Shape().Dim(-1),
	}
	if a.trace != nil {
		a.trace.SubBlocks = append(a.trace.SubBlocks, site)
		a.trace.countLayer(site.Layer)
	}
	if hook, ok := a.method.(SubBlockHook); ok {
		return hook.SubBlock(ctx, site, input, output)
	}
	return output
}

// Inputs is the input sequence of a model after its token embedding: what prompt tuning extends.
type Inputs struct {
	// Embeddings is [batch, seq, dim].
	Embeddings *graph.Node
	// Mask is [batch, seq] Bool: true for real tokens, false for padding.
	Mask *graph.Node
	// Positions is [batch, seq] Int32: the position of each token, for rotary embeddings.
	Positions *graph.Node
	// MaxLength is the longest sequence the model accepts (0: no limit). Methods that add
	// positions must stay within it.
	MaxLength int
	// Past is the number of key/value positions every attention layer holds before the first
	// input position, which an AttentionHook method (prefix tuning) adds in AttentionKeysValues
	// and sets here. The model lets every query attend to them, besides its causal and padding
	// mask, and counts them in its attention positions (a query at input position i is at
	// position Past+i). 0 for the model's own inputs.
	Past int
	// Cached is true when the inputs continue a sequence whose earlier positions, the method's
	// own added ones among them, the model holds in a key/value cache (the decoding steps of
	// llama.CausalLMStep); Positions then start after those cached positions. A method that adds
	// positions must add none again (they are in the cache) but number the tokens as it did on
	// the first call, and trim nothing in TrimOutputs: prompt tuning moves Positions up by its
	// virtual tokens and prepends nothing. False for a whole sequence (every other call).
	Cached bool
}

// EmbedInputs hands the embedded input sequence to the active method (prompt tuning prepends its
// virtual tokens here) and returns the sequence the model should run on.
func EmbedInputs(ctx *context.Context, in *Inputs) *Inputs {
	a := activeFor(ctx, in.Embeddings.Graph())
	if a == nil {
		return in
	}
	if a.trace != nil {
		a.trace.HasInputs = true
		a.trace.InputDim = in.Embeddings.Shape().Dim(-1)
		a.trace.MaxLength = in.MaxLength
		a.trace.SeqLength = in.Embeddings.Shape().Dim(1)
	}
	if hook, ok := a.method.(InputsHook); ok {
		return hook.Inputs(ctx, in)
	}
	return in
}

// AttentionKeysValues hands an attention layer's keys and values ([batch, seq, kvHeads, headDim],
// after the rotary embedding) to the active method and returns those the layer attends over:
// unchanged, or with an AttentionHook method's Inputs.Past positions before them (prefix tuning).
// Call it with ctx scoped to the attention sub-block (ctx.In("self_attn")).
func AttentionKeysValues(ctx *context.Context, keys, values *graph.Node) (*graph.Node, *graph.Node) {
	a := activeFor(ctx, keys.Graph())
	if a == nil {
		return keys, values
	}
	if keys.Rank() != 4 || !keys.Shape().Equal(values.Shape()) {
		panic(fmt.Sprintf("peft.AttentionKeysValues %q: keys and values must both be [batch, seq, kvHeads, headDim], got %s and %s",
			ctx.Scope(), keys.Shape(), values.Shape()))
	}
	site := &AttentionSite{
		Path:    ScopeToPath(ctx.Scope()),
		Scope:   ctx.Scope(),
		Layer:   LayerIndex(ctx.Scope()),
		KVHeads: keys.Shape().Dim(2),
		HeadDim: keys.Shape().Dim(3),
	}
	if a.trace != nil {
		a.trace.Attentions = append(a.trace.Attentions, site)
		a.trace.countLayer(site.Layer)
	}
	if hook, ok := a.method.(AttentionHook); ok {
		return hook.KeysValues(ctx, site, keys, values)
	}
	return keys, values
}

// TrimOutputs hands the final hidden states ([batch, seq', dim]) to the active method, which
// removes the positions it added in EmbedInputs, so heads see one position per real token.
func TrimOutputs(ctx *context.Context, hidden *graph.Node) *graph.Node {
	a := activeFor(ctx, hidden.Graph())
	if a == nil {
		return hidden
	}
	if hook, ok := a.method.(InputsHook); ok {
		return hook.Outputs(ctx, hidden)
	}
	return hidden
}

// countLayer makes NumLayers count the transformer block layer (a site's Layer, -1 outside the
// blocks) while a layout is traced.
func (l *Layout) countLayer(layer int) {
	l.NumLayers = max(l.NumLayers, layer+1)
}
