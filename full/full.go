// Package full implements full fine-tuning: every parameter of the base model trains, with three
// optional refinements that fight catastrophic forgetting.
//
// Layer-wise learning-rate decay (discriminative learning rates). With L = Layout.NumLayers
// transformer blocks, every base variable v gets the learning-rate multiplier
//
//	LRScale(v) = LayerDecay^(L − Depth(v))
//
// where Depth is peft.Layout.Depth: 0 for what comes before the first block (the token
// embeddings), i+1 for block i, and L for what comes after the last block (final norm and output
// heads), which so shares the top block's rate. For the 2-block tiny Llama and LayerDecay 0.5:
// embeddings 0.25, block 0 0.5, block 1 1, final norm and score head 1. LayerDecay 1 (the
// default) gives every variable the full rate. The trainer multiplies its scheduled rate by
// LRScale per variable (peft.AdamW), decoupled weight decay included.
//
// Freezing. FreezeLayers = k freezes the lowest k layers: the variables before the blocks
// (embeddings, Depth 0) and those of blocks 0..k−1. k = NumLayers leaves only the final norm and
// the heads training (a linear probe plus norm); note that a causal LM with tied embeddings then
// freezes its output projection too, because it is the embedding table.
//
// L2-SP (Li et al. 2018). With L2SP = λ > 0 the training loss becomes
//
//	loss = task loss + λ·Σ_v ‖θ_v − θ₀_v‖²
//
// summed over the trainable variables, where θ₀ are their values when the method is applied (the
// pretrained weights). Init copies each trainable variable into a frozen anchor variable
// <AnchorScope>/<variable scope>/<name> (e.g. "/full_l2sp/model/layers/0/mlp/up_proj/dense"
// "weights"); the anchors cost one extra copy of the trained weights in memory and are made only
// when λ > 0. The term is added in training graphs only; evaluation reports the task loss.
//
// Plain weight decay is not part of this method: use peft.TrainConfig.WeightDecay, AdamW's
// decoupled decay θ ← θ − lr·LRScale·wd·θ applied at each step, which is what full fine-tuning
// recipes (Hugging Face Trainer's weight_decay) mean by it. A second, loss-term form (λ‖θ‖²)
// would interact with Adam's normalization and give two knobs for one idea.
//
// State. A full fine-tune changes the whole model, so State (what peft.Model.Save writes and Load
// reads) is every base variable, frozen ones included: Save/Load round-trips the whole model. The
// L2-SP anchors are not saved: they are the pretrained values, which the model being loaded into
// was built from. A loaded model therefore anchors at the values it held when peft.NewModel
// applied the method (its pretrained weights), not at the saved fine-tuned weights: what resuming
// an L2-SP fine-tune needs, provided the model is rebuilt from the same pretrained weights.
package full

import (
	"fmt"
	"math"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft"
)

// AnchorScope is the top-level scope under which L2-SP keeps its anchors θ₀: the anchor of the
// variable <scope>/<name> is /<AnchorScope><scope>/<name>.
const AnchorScope = "full_l2sp"

// Config configures full fine-tuning. Start from DefaultConfig: the defaults named below are its
// values.
type Config struct {
	// LayerDecay is the layer-wise learning-rate decay: a variable at depth d of a model with L
	// blocks trains at lr·LayerDecay^(L−d). Default 1 (off). Must be in (0, 1].
	LayerDecay float64 `json:"layer_decay"`
	// FreezeLayers is the number k of lowest layers frozen: the embeddings and blocks 0..k−1
	// (nothing when 0). Default 0. Must be ≥ 0, and at most the model's number of blocks (checked
	// when the method is applied).
	FreezeLayers int `json:"freeze_layers"`
	// L2SP is the weight λ of the L2-SP term λ·Σ‖θ−θ₀‖² pulling the weights toward their
	// pretrained values. Default 0 (off). Must be finite and ≥ 0.
	L2SP float64 `json:"l2sp_lambda"`
}

// DefaultConfig returns plain full fine-tuning: no layer decay, nothing frozen, no L2-SP.
func DefaultConfig() Config {
	return Config{LayerDecay: 1}
}

// Validate checks the configuration, naming the first field that is wrong.
func (c Config) Validate() error {
	if !(c.LayerDecay > 0 && c.LayerDecay <= 1) {
		return fmt.Errorf("full: layer_decay must be in (0, 1], got %g", c.LayerDecay)
	}
	if c.FreezeLayers < 0 {
		return fmt.Errorf("full: freeze_layers must be ≥ 0, got %d", c.FreezeLayers)
	}
	if !(c.L2SP >= 0) || math.IsInf(c.L2SP, 0) {
		return fmt.Errorf("full: l2sp_lambda must be finite and ≥ 0, got %g", c.L2SP)
	}
	return nil
}

// Full is the full fine-tuning method. It implements peft.Method and peft.LossHook.
type Full struct {
	cfg       Config
	base      []*context.Variable      // every base variable, in creation order: the state
	trainable []peft.TrainableVariable // the unfrozen ones with their rates
	frozen    []*context.Variable
	anchors   []*context.Variable // θ₀ of trainable[i] (L2-SP only)
	depths    map[*context.Variable]int
}

// New returns full fine-tuning with cfg, or an error naming what is wrong with it.
func New(cfg Config) (*Full, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Full{cfg: cfg}, nil
}

// Name implements peft.Method.
func (f *Full) Name() string { return "full" }

// Config implements peft.Method.
func (f *Full) Config() any { return f.cfg }

// Init implements peft.Method: it checks FreezeLayers against the model, splits the base
// variables into frozen and trainable ones, gives each trainable one its learning-rate multiplier
// and, with L2-SP, copies it into its anchor.
func (f *Full) Init(ctx *context.Context, layout *peft.Layout) error {
	if f.cfg.FreezeLayers > layout.NumLayers {
		return fmt.Errorf("full: freeze_layers %d exceeds the model's %d layers", f.cfg.FreezeLayers, layout.NumLayers)
	}
	f.base = append([]*context.Variable(nil), layout.BaseVariables...)
	f.trainable, f.frozen, f.anchors = nil, nil, nil
	f.depths = map[*context.Variable]int{}
	for _, v := range f.base {
		depth := layout.Depth(v)
		f.depths[v] = depth
		if f.isFrozen(v, depth) {
			f.frozen = append(f.frozen, v)
			continue
		}
		scale := math.Pow(f.cfg.LayerDecay, float64(layout.NumLayers-depth))
		f.trainable = append(f.trainable, peft.TrainableVariable{Variable: v, LRScale: scale})
	}
	if f.cfg.L2SP == 0 {
		return nil
	}
	for _, tv := range f.trainable {
		v := tv.Variable
		value, err := v.Value()
		if err != nil {
			return fmt.Errorf("full: reading %s for its L2-SP anchor: %w", v.ScopeAndName(), err)
		}
		anchorValue, err := value.Clone()
		if err != nil {
			return fmt.Errorf("full: copying %s for its L2-SP anchor: %w", v.ScopeAndName(), err)
		}
		anchor := ctx.InAbsPath(anchorScope(v)).Checked(false).VariableWithValue(v.Name(), anchorValue)
		anchor.SetTrainable(false)
		f.anchors = append(f.anchors, anchor)
	}
	return nil
}

// anchorScope is the scope of v's L2-SP anchor.
func anchorScope(v *context.Variable) string {
	return context.ScopeSeparator + AnchorScope + v.Scope()
}

// isFrozen says whether FreezeLayers freezes v: the variables before the blocks and those of
// blocks 0..k−1, never those after the blocks (which share the top block's depth).
func (f *Full) isFrozen(v *context.Variable, depth int) bool {
	k := f.cfg.FreezeLayers
	if k == 0 {
		return false
	}
	if layer := peft.LayerIndex(v.Scope()); layer >= 0 {
		return layer < k
	}
	return depth == 0
}

// Trainable implements peft.Method: every base variable not frozen, with LRScale
// LayerDecay^(NumLayers − Depth).
func (f *Full) Trainable(*context.Context) []peft.TrainableVariable {
	return append([]peft.TrainableVariable(nil), f.trainable...)
}

// State implements peft.Method: every base variable, frozen ones included, so Save/Load
// round-trips the whole model. The L2-SP anchors are not part of it (see the package doc).
func (f *Full) State(*context.Context) []*context.Variable {
	return append([]*context.Variable(nil), f.base...)
}

// Frozen lists the base variables FreezeLayers froze, in creation order.
func (f *Full) Frozen() []*context.Variable {
	return append([]*context.Variable(nil), f.frozen...)
}

// Depth returns the depth (peft.Layout.Depth) Init found for the base variable v, or -1 if v is
// not a base variable.
func (f *Full) Depth(v *context.Variable) int {
	if d, found := f.depths[v]; found {
		return d
	}
	return -1
}

// Anchor returns the L2-SP anchor θ₀ of the trainable variable v, or nil if there is none
// (L2SP = 0, or v frozen or not a base variable).
func (f *Full) Anchor(v *context.Variable) *context.Variable {
	for i, tv := range f.trainable {
		if tv.Variable == v && i < len(f.anchors) {
			return f.anchors[i]
		}
	}
	return nil
}

// Loss implements peft.LossHook: λ·Σ‖θ−θ₀‖² over the trainable variables when L2SP = λ > 0,
// nil otherwise. The anchors receive no gradient.
func (f *Full) Loss(_ *context.Context, g *graph.Graph) *graph.Node {
	if f.cfg.L2SP == 0 || len(f.anchors) == 0 {
		return nil
	}
	vars := make([]*context.Variable, len(f.trainable))
	for i, tv := range f.trainable {
		vars[i] = tv.Variable
	}
	return peft.L2Toward(g, f.cfg.L2SP, vars, f.anchors)
}
