package peft

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/shapes"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/ml/context"
)

// LinearLayer describes one linear layer of a model, as seen by methods: where it is, its sizes
// and how to compute its base output.
//
// Its variables keep GoMLX layers.Dense names (<Scope>/dense/weights [In, Out] and
// <Scope>/dense/biases [Out]), so checkpoints of models written with layers.Dense load unchanged.
// Note the layout: weights are [In, Out] (y = x·W), the transpose of PyTorch's nn.Linear.
type LinearLayer struct {
	// Path is the layer's name in Hugging Face style: its scope with dots, e.g.
	// "model.layers.0.self_attn.q_proj". Target patterns match against it.
	Path string
	// Scope is the GoMLX context scope of the layer, e.g. "/model/layers/0/self_attn/q_proj".
	Scope string
	// In and Out are the input and output feature sizes.
	In, Out int
	// UseBias says whether the layer has a bias.
	UseBias bool
	// Head is true for output heads (language-model head, classifier): "all-linear" skips them.
	Head bool
	// Layer is the index of the transformer block the layer is in (the first number in Path),
	// or -1 outside the blocks.
	Layer int
}

// WeightsScope is the scope holding the layer's variables ("weights" and "biases").
func (l *LinearLayer) WeightsScope() string { return l.Scope + context.ScopeSeparator + "dense" }

// Weights returns the layer's weight variable ([In, Out]), or nil if it does not exist (a method
// such as QLoRA may have replaced it).
func (l *LinearLayer) Weights(ctx *context.Context) *context.Variable {
	return ctx.GetVariableByScopeAndName(l.WeightsScope(), "weights")
}

// Biases returns the layer's bias variable, or nil if the layer has none.
func (l *LinearLayer) Biases(ctx *context.Context) *context.Variable {
	if !l.UseBias {
		return nil
	}
	return ctx.GetVariableByScopeAndName(l.WeightsScope(), "biases")
}

// Base computes the layer's own output x·W (+ b) for x shaped [..., In].
func (l *LinearLayer) Base(ctx *context.Context, x *graph.Node) *graph.Node {
	w := l.Weights(ctx)
	if w == nil {
		panic("peft: linear layer " + l.Path + " has no weights variable (was it replaced by a method?)")
	}
	return l.Apply(ctx, x, w.ValueGraph(x.Graph()))
}

// Apply computes x·weights (+ the layer's bias) for a weights node shaped [In, Out]: methods that
// replace the weight (a dequantized or merged one) use it to keep the bias handling in one place.
func (l *LinearLayer) Apply(ctx *context.Context, x, weights *graph.Node) *graph.Node {
	if weights.DType() != x.DType() {
		weights = graph.ConvertDType(weights, x.DType())
	}
	y := MatMulLast(x, weights)
	if b := l.Biases(ctx); b != nil {
		y = graph.Add(y, graph.ExpandLeftToRank(b.ValueGraph(x.Graph()), y.Rank()))
	}
	return y
}

// MatMulLast multiplies the last axis of x ([..., n]) with a matrix w ([n, m]), giving [..., m].
func MatMulLast(x, w *graph.Node) *graph.Node {
	if x.Rank() == 2 {
		return graph.Dot(x, w)
	}
	dims := x.Shape().Dimensions
	flat := graph.Reshape(x, -1, dims[len(dims)-1])
	out := graph.Dot(flat, w)
	outDims := append(append([]int{}, dims[:len(dims)-1]...), w.Shape().Dimensions[1])
	return graph.Reshape(out, outDims...)
}

// SubBlockKind says which transformer sub-block a SubBlockSite is.
type SubBlockKind string

const (
	// Attention is the self-attention sub-block.
	Attention SubBlockKind = "attention"
	// FeedForward is the feed-forward (MLP) sub-block.
	FeedForward SubBlockKind = "feed_forward"
)

// SubBlockSite describes one sub-block of a transformer block, where adapters attach.
type SubBlockSite struct {
	// Path is the sub-block's name with dots, e.g. "model.layers.0.mlp".
	Path string
	// Scope is its GoMLX scope.
	Scope string
	// Kind is Attention or FeedForward.
	Kind SubBlockKind
	// Layer is the index of the transformer block.
	Layer int
	// Dim is the hidden size of the sub-block's input and output.
	Dim int
}

// AttentionSite describes the keys and values of one attention layer, where prefix tuning
// attaches (AttentionKeysValues records it).
type AttentionSite struct {
	// Path is the attention sub-block's name with dots, e.g. "model.layers.0.self_attn".
	Path string
	// Scope is its GoMLX scope.
	Scope string
	// Layer is the index of the transformer block.
	Layer int
	// KVHeads and HeadDim are the number of key/value heads (fewer than the query heads under
	// grouped-query attention) and the width of one head.
	KVHeads, HeadDim int
}

// EmbeddingSite describes a token-embedding table.
type EmbeddingSite struct {
	// Path is the table's name with dots, e.g. "model.embed_tokens".
	Path string
	// Scope is its GoMLX scope; the table is the variable "embeddings" there, shaped [Vocab, Dim].
	Scope string
	// Vocab and Dim are the table's sizes.
	Vocab, Dim int
}

// Table returns the embedding table variable.
func (e *EmbeddingSite) Table(ctx *context.Context) *context.Variable {
	return ctx.GetVariableByScopeAndName(e.Scope, "embeddings")
}

// Layout is what a method can see of a model: found by building the model's graph once (NewModel
// does it) and recording every building block that ran.
type Layout struct {
	// Linears lists the linear layers in the order the model uses them.
	Linears []*LinearLayer
	// SubBlocks lists the attention and feed-forward sub-blocks in order.
	SubBlocks []*SubBlockSite
	// Embeddings lists the token-embedding tables.
	Embeddings []*EmbeddingSite
	// Attentions lists the attention layers' keys and values (AttentionKeysValues) in order.
	Attentions []*AttentionSite
	// HasInputs is true if the model calls EmbedInputs (needed by prompt tuning).
	HasInputs bool
	// InputDim is the width of the input embeddings passed to EmbedInputs.
	InputDim int
	// MaxLength is the model's maximum sequence length as given to EmbedInputs (0: unbounded).
	MaxLength int
	// SeqLength is the sequence length of the example the layout was traced with.
	SeqLength int
	// NumLayers is the number of transformer blocks: one more than the largest Layer seen.
	NumLayers int
	// BaseVariables are the model's own variables, in creation order.
	BaseVariables []*context.Variable
	// Task is what the model declared its outputs serve (SetTask), or "".
	Task TaskType
	// NumInputs is the number of inputs the model was traced with (ids and mask, say).
	NumInputs int
	// Outputs are the shapes of the model's outputs on the traced example.
	Outputs []shapes.Shape
}

// Depth returns how deep in the model a variable of the base model sits, for layer-wise learning
// rates and freezing: 0 for what comes before the first transformer block (embeddings), i+1 for
// block i, and NumLayers for what comes after the last block (final norm, heads), which so shares
// the top block's depth.
func (l *Layout) Depth(v *context.Variable) int {
	if layer := LayerIndex(v.Scope()); layer >= 0 {
		return layer + 1
	}
	for _, base := range l.BaseVariables {
		if LayerIndex(base.Scope()) >= 0 {
			// A block variable was created before v: v comes after the blocks.
			return l.NumLayers
		}
		if base == v {
			return 0
		}
	}
	return l.NumLayers
}

// Linear returns the linear layer with the given path, or nil.
func (l *Layout) Linear(path string) *LinearLayer {
	for _, lin := range l.Linears {
		if lin.Path == path {
			return lin
		}
	}
	return nil
}

// LinearPaths lists the paths of all linear layers.
func (l *Layout) LinearPaths() []string {
	paths := make([]string, len(l.Linears))
	for i, lin := range l.Linears {
		paths[i] = lin.Path
	}
	return paths
}

// ScopeToPath turns a GoMLX scope ("/model/layers/0/mlp") into a dotted path ("model.layers.0.mlp").
func ScopeToPath(scope string) string {
	return strings.ReplaceAll(strings.TrimPrefix(scope, context.ScopeSeparator), context.ScopeSeparator, ".")
}

// LayerIndex returns the first all-digits element of a scope or dotted path, the transformer block
// index by Hugging Face naming ("model.layers.3.mlp" → 3), or -1 if there is none.
func LayerIndex(scopeOrPath string) int {
	for _, part := range strings.FieldsFunc(scopeOrPath, func(r rune) bool { return r == '/' || r == '.' }) {
		if strings.Trim(part, "0123456789") != "" {
			continue
		}
		if n, err := strconv.Atoi(part); err == nil {
			return n
		}
	}
	return -1
}

// MaxRankGrowth bounds a low-rank adapter on a layer: its factors may hold at most this many times
// the values of the weight they adapt. A rank above min(in, out) already adds nothing; this refuses
// only the absurd (an adapter_config.json's "r": 100000000), before it is allocated.
const MaxRankGrowth = 64

// CheckRank returns an error if factors of rank r on layer ([in, r] and [r, out]) would hold
// over MaxRankGrowth times the layer's weight.
func CheckRank(layer *LinearLayer, r int) error {
	// In float64: a hostile r would overflow an int64 product.
	if n := float64(r) * float64(layer.In+layer.Out); n > MaxRankGrowth*float64(layer.In)*float64(layer.Out) {
		return fmt.Errorf("rank %d on %s (%d×%d) would hold %.0f values, over %d times the weight it adapts: a rank this large is a mistake (an adapter_config.json's r?)",
			r, layer.Path, layer.In, layer.Out, n, MaxRankGrowth)
	}
	return nil
}

// CheckVirtualTokens errs when n positions added before every sequence (prompt or prefix
// tuning's num_virtual_tokens) leave no room in the model's maximum length, or do not fit with
// the example the layout was traced with.
func (l *Layout) CheckVirtualTokens(n int) error {
	max := l.MaxLength
	switch {
	case max <= 0:
		return nil
	case n >= max:
		return fmt.Errorf("num_virtual_tokens %d leaves no room in the model's maximum length %d", n, max)
	case n+l.SeqLength > max:
		return fmt.Errorf("num_virtual_tokens %d plus the example's length %d is %d, more than the model's maximum length %d",
			n, l.SeqLength, n+l.SeqLength, max)
	}
	return nil
}
