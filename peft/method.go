package peft

import (
	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/ml/context"
)

// Method is a fine-tuning method: LoRA, adapters, prompt tuning, full fine-tuning, …
//
// A Method is applied to a model with NewModel. The model is written once with this package's
// building blocks (Linear, Embedding, SubBlock, EmbedInputs, TrimOutputs); each building block asks
// the active method whether it wants to change what the block computes. So the same model code runs
// plain, with LoRA, with adapters or with prompt tuning, and switching method is one line.
//
// Method itself is small: what every method must say. What a method changes in the graph it says by
// also implementing the optional hook interfaces: LinearHook (per-linear-layer updates such as LoRA
// or a quantized base weight), SubBlockHook (modules after or beside attention and feed-forward),
// InputsHook (virtual tokens and masks), AttentionHook (key/value positions of the method's own in
// every attention layer), LossHook (extra loss terms), GradientHook and StepHook (work after each
// optimizer step) and Merger (folding the update into the base weights).
type Method interface {
	// Name identifies the method ("lora", "adapter", …). It is written with saved state and
	// checked on load.
	Name() string

	// Config returns the method's configuration. It must marshal to JSON: Save writes it next to
	// the method's tensors.
	Config() any

	// Init is called once by NewModel with the layout of the model: its linear layers, sub-blocks
	// and inputs. The method validates its configuration against the layout (a target that matches
	// no layer is an error here), creates its variables in ctx and freezes what it does not train.
	// The base model's variables exist and hold values when Init runs.
	Init(ctx *context.Context, layout *Layout) error

	// Trainable lists the variables the method trains, each with its learning-rate multiplier.
	// The trainer optimizes exactly these variables and nothing else.
	Trainable(ctx *context.Context) []TrainableVariable

	// State lists the variables that make up the method's own state: what Save writes and Load
	// reads. For PEFT methods it is the adapter weights; for full fine-tuning, the whole model.
	State(ctx *context.Context) []*context.Variable
}

// TrainableVariable is a variable a method trains, with the multiplier applied to the
// learning rate for it (1 for most methods; smaller for lower layers under layer-wise decay).
type TrainableVariable struct {
	Variable *context.Variable
	LRScale  float64
}

// LinearHook is implemented by methods that change linear layers (LoRA, DoRA, QLoRA).
type LinearHook interface {
	// Linear returns the output of layer for input x. It is called for every linear layer of the
	// model: the method computes the base output with layer.Base (or its own replacement of the
	// weight) and adds its update on the layers it selected in Init, returning layer.Base's
	// output unchanged on the others.
	Linear(ctx *context.Context, layer *LinearLayer, x *graph.Node) *graph.Node
}

// SubBlockHook is implemented by methods that insert modules around a transformer sub-block
// (bottleneck adapters).
type SubBlockHook interface {
	// SubBlock returns the sub-block's output as the method changes it. input is what the
	// sub-block received (after its normalization) and output what it computed, before the
	// residual connection adds it to the stream.
	SubBlock(ctx *context.Context, block *SubBlockSite, input, output *graph.Node) *graph.Node
}

// InputsHook is implemented by methods that change the input sequence (prompt tuning).
type InputsHook interface {
	// Inputs returns the (possibly longer) input embeddings, mask and positions.
	Inputs(ctx *context.Context, in *Inputs) *Inputs
	// Outputs undoes on the final hidden states what Inputs added, so the heads see one position
	// per real token.
	Outputs(ctx *context.Context, hidden *graph.Node) *graph.Node
}

// AttentionHook is implemented by methods that give every attention layer key/value positions of
// their own before the sequence (prefix tuning). Such a method also implements InputsHook, where
// it sets Inputs.Past to the number of those positions and numbers the tokens after them, so that
// the model's mask lets every query see them.
type AttentionHook interface {
	// KeysValues returns the keys and values the attention at site attends over, given the
	// layer's own ([batch, seq, kvHeads, headDim], rotary embedding applied): the method's Past
	// positions first, then the given ones ([batch, Past+seq, kvHeads, headDim]).
	KeysValues(ctx *context.Context, site *AttentionSite, keys, values *graph.Node) (*graph.Node, *graph.Node)
}

// LossHook is implemented by methods that add a term to the training loss (L2 toward the
// pretrained weights, AdaLoRA's orthogonal regularization).
type LossHook interface {
	// Loss returns a scalar added to the task loss in training graphs, or nil.
	Loss(ctx *context.Context, g *graph.Graph) *graph.Node
}

// GradientHook is implemented by methods that need the gradients of their variables inside the
// training step (AdaLoRA's importance scores). It is called in the train-step graph, after the
// gradients are computed and before the optimizer update.
type GradientHook interface {
	ObserveGradients(ctx *context.Context, g *graph.Graph, vars []*context.Variable, grads []*graph.Node)
}

// StepHook is implemented by methods that act after each optimizer step, outside the graph
// (AdaLoRA's rank reallocation). step counts from 1.
type StepHook interface {
	AfterStep(ctx *context.Context, step int) error
}

// Merger is implemented by methods whose update can be folded into the base weights, so that
// inference costs nothing extra. Unmerge restores the base weights exactly.
type Merger interface {
	Merge(ctx *context.Context) error
	Unmerge(ctx *context.Context) error
	Merged() bool
}

// TrainAll lists vars as trainable at the base learning rate (LRScale 1): what most PEFT methods
// train, their own weights followed by their modules to save.
func TrainAll(vars ...*context.Variable) []TrainableVariable {
	tvs := make([]TrainableVariable, len(vars))
	for i, v := range vars {
		tvs[i] = TrainableVariable{Variable: v, LRScale: 1}
	}
	return tvs
}

// VariablesOf lists the variables of tvs, in order: the State of methods that save exactly what
// they train.
func VariablesOf(tvs []TrainableVariable) []*context.Variable {
	vars := make([]*context.Variable, len(tvs))
	for i, tv := range tvs {
		vars[i] = tv.Variable
	}
	return vars
}
