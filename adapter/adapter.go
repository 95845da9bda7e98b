// Package adapter implements bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; the
// parallel adapter of He et al. 2021), with AdapterHub's placements and defaults.
//
// An adapter is a small two-layer network with a bottleneck, attached to a transformer sub-block
// whose output is h (before the residual connection adds it to the stream) and whose input, after
// the sub-block's normalization, is x:
//
//	f(z)       = act(z·Wdown + bdown)·Wup + bup         Wdown [dim, m], Wup [m, dim], m = dim/ReductionFactor
//	sequential: h' = h + s·f(h)                         ("houlsby", "pfeiffer")
//	parallel:   h' = h + s·f(x)                         ("parallel": beside the sub-block, reading its input)
//
// with s = Scale. The residual connection then adds h' to the stream instead of h. Placements:
//
//   - "houlsby" (AdapterHub "double_seq_bn"): a sequential adapter after the attention sub-block
//     and one after the feed-forward sub-block of every layer. Defaults: reduction 16, swish.
//   - "pfeiffer" (AdapterHub "seq_bn"): a sequential adapter after the feed-forward sub-block only.
//     Defaults: reduction 16, relu.
//   - "parallel" (AdapterHub "par_bn", He et al.'s parallel adapter): beside the feed-forward
//     sub-block, reading the same normalized input. Defaults: reduction 2, relu, scale 4.
//
// Only the adapters train (and the base modules named in ModulesToSave, such as a new classifier
// head); the base model stays frozen.
//
// Initialization: Wup, bup and bdown start at zero, so f ≡ 0 and a fresh model computes exactly
// (bit for bit) what the base model computes. Wdown is drawn from U(−1/√dim, 1/√dim), PyTorch's
// default for nn.Linear (kaiming_uniform with a=√5): AdapterHub's "mam_adapter" init (par_bn's
// default) and LoRA's init of A. We use it for every placement. AdapterHub's other inits ("bert":
// N(0, 0.02²), "houlsby": truncated N(0, 0.01²), on both projections) leave Wup non-zero, so the
// model would not start exactly at the base. Why not a tiny N(0, 0.01²) for Wdown alone: with
// Wup = 0 the first gradient Wup receives is proportional to act(z·Wdown); a tiny Wdown makes
// those activations, and so the start of training, tiny too, whereas Kaiming-uniform keeps the
// bottleneck activations of the order of the input's.
//
// Where the adapter reads: the formulas above are Houlsby et al.'s (the sequential adapter reads
// the sub-block's output) and He et al.'s (the parallel one reads the sub-block's input, which in
// a pre-norm model like Llama is the normalized stream). AdapterHub on pre-norm models differs:
// its sequential configs (original_ln_before) feed the adapter h + the residual stream, and par_bn
// feeds it the un-normalized stream. peft.SubBlockHook does not see the residual stream, so those
// variants are not offered.
//
// Adapters cannot be merged into the base weights (the activation makes them nonlinear), so this
// method does not implement peft.Merger and peft.Model.Merge returns an error.
//
// Storage: for a sub-block at scope S (e.g. /model/layers/0/mlp) the variables are
//
//	S/adapter/down/weights [dim, m]    S/adapter/down/biases [m]
//	S/adapter/up/weights   [m, dim]    S/adapter/up/biases   [dim]
//
// in GoMLX's layers.Dense layout ([in, out], y = x·W + b), the transpose of PyTorch's nn.Linear
// weight as AdapterHub stores it (adapter_down.0.weight [m, dim], adapter_up.weight [dim, m]).
package adapter

import (
	"fmt"
	"math"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gomlx/pkg/ml/layers/activations"

	"peft/peft"
)

// Placements: where adapters attach (Config.Placement).
const (
	// PlacementHoulsby puts a sequential adapter after the attention and after the feed-forward
	// sub-block of every layer (Houlsby et al. 2019; AdapterHub "double_seq_bn").
	PlacementHoulsby = "houlsby"
	// PlacementPfeiffer puts a sequential adapter after the feed-forward sub-block only (Pfeiffer
	// et al. 2020; AdapterHub "seq_bn").
	PlacementPfeiffer = "pfeiffer"
	// PlacementParallel puts an adapter beside the feed-forward sub-block, reading its input (He
	// et al. 2021; AdapterHub "par_bn").
	PlacementParallel = "parallel"
)

// Activations: the bottleneck's nonlinearity (Config.Activation).
const (
	// ActivationReLU is max(z, 0).
	ActivationReLU = "relu"
	// ActivationSwish is z·sigmoid(z), also called SiLU.
	ActivationSwish = "swish"
	// ActivationSiLU is another name for ActivationSwish, accepted as the same function.
	ActivationSiLU = "silu"
	// ActivationGELU is the exact z·Φ(z) with the Gaussian CDF Φ (PyTorch's and Hugging Face's
	// "gelu", not the tanh approximation).
	ActivationGELU = "gelu"
	// ActivationTanh is the hyperbolic tangent.
	ActivationTanh = "tanh"
)

// Config configures bottleneck adapters. Start from DefaultConfig (or Houlsby, Pfeiffer,
// Parallel).
type Config struct {
	// Placement is "houlsby", "pfeiffer" or "parallel" (the Placement… constants). Required.
	Placement string `json:"placement"`
	// ReductionFactor divides the hidden size to give the bottleneck width m = dim/ReductionFactor.
	// It must be > 0, and Init requires it to divide the model's hidden size. Default 16
	// (sequential) or 2 (parallel), AdapterHub's defaults.
	ReductionFactor int `json:"reduction_factor"`
	// Activation of the bottleneck: "relu", "swish" (or "silu"), "gelu" or "tanh" (the Activation…
	// constants). Default swish for Houlsby, relu otherwise (AdapterHub's defaults).
	Activation string `json:"non_linearity"`
	// Scale s multiplies the adapter's output. Must be > 0 and finite. Default 1 for the
	// sequential placements and 4 for Parallel (He et al.; AdapterHub par_bn's scaling).
	Scale float64 `json:"scaling"`
	// ModulesToSave lists modules of the base model trained and saved in full besides the
	// adapters, such as a new classifier head ("score"). Default none.
	ModulesToSave []string `json:"modules_to_save,omitempty"`
	// Seed of the down-projections' random initialization. Default 0.
	Seed uint64 `json:"seed"`
}

// DefaultConfig returns AdapterHub's defaults for a placement: reduction 16 and swish for Houlsby,
// reduction 16 and relu for Pfeiffer, reduction 2, relu and scale 4 for Parallel; scale 1 for the
// sequential ones. For an unknown placement it returns Pfeiffer's values with that placement,
// which Validate (and New) then reject.
func DefaultConfig(placement string) Config {
	cfg := Config{Placement: placement, ReductionFactor: 16, Activation: ActivationReLU, Scale: 1}
	switch placement {
	case PlacementHoulsby:
		cfg.Activation = ActivationSwish
	case PlacementParallel:
		cfg.ReductionFactor = 2
		cfg.Scale = 4
	}
	return cfg
}

// Houlsby returns DefaultConfig(PlacementHoulsby): adapters after attention and after the
// feed-forward, reduction 16, swish, scale 1.
func Houlsby() Config { return DefaultConfig(PlacementHoulsby) }

// Pfeiffer returns DefaultConfig(PlacementPfeiffer): an adapter after the feed-forward, reduction
// 16, relu, scale 1.
func Pfeiffer() Config { return DefaultConfig(PlacementPfeiffer) }

// Parallel returns DefaultConfig(PlacementParallel): an adapter beside the feed-forward, reduction
// 2, relu, scale 4.
func Parallel() Config { return DefaultConfig(PlacementParallel) }

// kinds returns the sub-block kinds a placement adapts, or nil for an unknown placement.
func kinds(placement string) []peft.SubBlockKind {
	switch placement {
	case PlacementHoulsby:
		return []peft.SubBlockKind{peft.Attention, peft.FeedForward}
	case PlacementPfeiffer, PlacementParallel:
		return []peft.SubBlockKind{peft.FeedForward}
	}
	return nil
}

// Validate checks the configuration, naming the first field that is wrong. Whether
// ReductionFactor suits the model's hidden size is checked in Init, where the size is known.
func (c Config) Validate() error {
	if kinds(c.Placement) == nil {
		return fmt.Errorf("adapter: unknown placement %q (want %q, %q or %q)", c.Placement, PlacementHoulsby, PlacementPfeiffer, PlacementParallel)
	}
	if c.ReductionFactor <= 0 {
		return fmt.Errorf("adapter: reduction_factor must be > 0, got %d", c.ReductionFactor)
	}
	switch c.Activation {
	case ActivationReLU, ActivationSwish, ActivationSiLU, ActivationGELU, ActivationTanh:
	default:
		return fmt.Errorf("adapter: unknown activation (non_linearity) %q (want %q, %q, %q, %q or %q)",
			c.Activation, ActivationReLU, ActivationSwish, ActivationSiLU, ActivationGELU, ActivationTanh)
	}
	if !(c.Scale > 0) || math.IsInf(c.Scale, 0) {
		return fmt.Errorf("adapter: scaling must be > 0 and finite, got %g", c.Scale)
	}
	for _, name := range c.ModulesToSave {
		if name == "" {
			return fmt.Errorf("adapter: modules_to_save: empty name in %q", c.ModulesToSave)
		}
	}
	return nil
}

// Adapter is the bottleneck-adapter method. It implements peft.Method and peft.SubBlockHook
// (and deliberately not peft.Merger).
type Adapter struct {
	cfg     Config
	sites   map[string]*site    // by sub-block path
	order   []*site             // model order
	modules []*context.Variable // ModulesToSave's variables
}

// site is one adapted sub-block.
type site struct {
	block                  *peft.SubBlockSite
	bottleneck             int
	downW, downB, upW, upB *context.Variable
}

// New returns adapters with cfg, or an error naming what is wrong with it.
func New(cfg Config) (*Adapter, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Adapter{cfg: cfg}, nil
}

// Name implements peft.Method.
func (a *Adapter) Name() string { return "adapter" }

// Config implements peft.Method.
func (a *Adapter) Config() any { return a.cfg }

// Init implements peft.Method: it finds the sub-blocks the placement adapts, checks the reduction
// factor against each one's hidden size and creates the adapter's variables.
func (a *Adapter) Init(ctx *context.Context, layout *peft.Layout) error {
	want := kinds(a.cfg.Placement)
	var selected []*peft.SubBlockSite
	found := map[peft.SubBlockKind]bool{}
	for _, block := range layout.SubBlocks {
		for _, kind := range want {
			if block.Kind == kind {
				selected = append(selected, block)
				found[kind] = true
			}
		}
	}
	for _, kind := range want {
		if !found[kind] {
			return fmt.Errorf("adapter: placement %q needs %s sub-blocks, but the model has none%s "+
				"(a model exposes its sub-blocks by running them through peft.SubBlock)",
				a.cfg.Placement, kind, describeSubBlocks(layout))
		}
	}
	var err error
	if a.modules, err = peft.ModulesToSave(layout, a.cfg.ModulesToSave); err != nil {
		return fmt.Errorf("adapter: %w", err)
	}
	rf := a.cfg.ReductionFactor
	for _, block := range selected {
		if block.Dim%rf != 0 || block.Dim/rf < 1 {
			return fmt.Errorf("adapter: reduction_factor %d does not divide the hidden size %d of sub-block %s "+
				"(the bottleneck would be %g wide; it must be a whole number ≥ 1)",
				rf, block.Dim, block.Path, float64(block.Dim)/float64(rf))
		}
	}
	rng := peft.NewRand(a.cfg.Seed)
	a.sites = map[string]*site{}
	a.order = nil
	for _, block := range selected {
		dim := block.Dim
		m := dim / rf
		scope := ctx.InAbsPath(block.Scope).In("adapter")
		down, up := scope.In("down"), scope.In("up")
		s := &site{
			block:      block,
			bottleneck: m,
			downW:      peft.NewVariable(down, "weights", peft.Uniform(rng, dim*m, 1/math.Sqrt(float64(dim))), dim, m),
			downB:      peft.NewVariable(down, "biases", make([]float32, m), m),
			upW:        peft.NewVariable(up, "weights", make([]float32, m*dim), m, dim),
			upB:        peft.NewVariable(up, "biases", make([]float32, dim), dim),
		}
		a.sites[block.Path] = s
		a.order = append(a.order, s)
	}
	return nil
}

// describeSubBlocks lists the sub-blocks a layout has, for error messages.
func describeSubBlocks(layout *peft.Layout) string {
	if len(layout.SubBlocks) == 0 {
		return " (it has no sub-blocks at all)"
	}
	parts := make([]string, len(layout.SubBlocks))
	for i, b := range layout.SubBlocks {
		parts[i] = fmt.Sprintf("%s (%s)", b.Path, b.Kind)
	}
	return "; its sub-blocks are: " + strings.Join(parts, ", ")
}

// Sites lists the paths of the adapted sub-blocks, in model order.
func (a *Adapter) Sites() []string {
	paths := make([]string, len(a.order))
	for i, s := range a.order {
		paths[i] = s.block.Path
	}
	return paths
}

// Bottleneck returns the bottleneck width of the adapter at the sub-block path, or 0 if that
// sub-block is not adapted.
func (a *Adapter) Bottleneck(path string) int {
	if s := a.sites[path]; s != nil {
		return s.bottleneck
	}
	return 0
}

// Trainable implements peft.Method: the four variables of every adapter, and the modules to save.
func (a *Adapter) Trainable(*context.Context) []peft.TrainableVariable {
	vars := make([]*context.Variable, 0, 4*len(a.order)+len(a.modules))
	for _, s := range a.order {
		vars = append(vars, s.downW, s.downB, s.upW, s.upB)
	}
	return peft.TrainAll(append(vars, a.modules...)...)
}

// State implements peft.Method: what Trainable lists.
func (a *Adapter) State(ctx *context.Context) []*context.Variable {
	return peft.VariablesOf(a.Trainable(ctx))
}

// SubBlock implements peft.SubBlockHook: output + s·f(output) for the sequential placements,
// output + s·f(input) for the parallel placement, on the adapted sub-blocks; other sub-blocks pass
// unchanged.
func (a *Adapter) SubBlock(ctx *context.Context, block *peft.SubBlockSite, input, output *graph.Node) *graph.Node {
	s := a.sites[block.Path]
	if s == nil {
		return output
	}
	z := output
	if a.cfg.Placement == PlacementParallel {
		z = input
	}
	g := z.Graph()
	value := func(v *context.Variable) *graph.Node {
		n := v.ValueGraph(g)
		if n.DType() != z.DType() {
			n = graph.ConvertDType(n, z.DType())
		}
		return n
	}
	hidden := graph.Add(peft.MatMulLast(z, value(s.downW)), graph.ExpandLeftToRank(value(s.downB), z.Rank()))
	hidden = activate(a.cfg.Activation, hidden)
	update := graph.Add(peft.MatMulLast(hidden, value(s.upW)), graph.ExpandLeftToRank(value(s.upB), z.Rank()))
	return graph.Add(output, graph.MulScalar(update, a.cfg.Scale))
}

// activate applies the named activation (validated by Config.Validate).
func activate(name string, x *graph.Node) *graph.Node {
	switch name {
	case ActivationReLU:
		return activations.Relu(x)
	case ActivationSwish, ActivationSiLU:
		return activations.Swish(x)
	case ActivationGELU:
		return activations.Gelu(x)
	case ActivationTanh:
		return graph.Tanh(x)
	}
	panic(fmt.Sprintf("adapter: unknown activation %q", name))
}
