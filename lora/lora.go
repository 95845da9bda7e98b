// Package lora implements LoRA (Hu et al. 2021): each selected linear layer computes
//
//	y = x·W + s·(dropout(x)·A)·B,   s = Alpha/Rank (or Alpha/√Rank with rsLoRA)
//
// with W frozen and only A [in, r] and B [r, out] trained. B starts at zero, so a fresh model
// computes exactly what the base model computes; Merge folds s·A·B into W for zero inference cost.
//
// With Config.UseDoRA it is DoRA (Liu et al. 2024, Hugging Face PEFT's use_dora): the adapted
// weight is split into a direction and a trained magnitude m [out],
//
//	W' = m · (W + s·A·B) / ‖W + s·A·B‖,   ‖·‖ the L2 norm of each output column of W [in, out]
//
// (of each row of PyTorch's [out, in] weight, as PEFT computes it). The norm is detached from the
// gradient, as the paper's section 4.3 and PEFT do, and m starts at ‖W‖, so a fresh model computes
// what the base computes up to float32 rounding.
//
// Storage: A and B live beside the layer's weights, in the scope <layer>/lora, in GoMLX's
// [in, out] layout: A here is the transpose of Hugging Face PEFT's lora_A.weight [r, in] and B the
// transpose of lora_B.weight [out, r]. The math is the same.
package lora

import (
	"fmt"
	"log"
	"math"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gomlx/pkg/ml/layers"

	"peft/peft"
)

// Init names for Config.InitA.
const (
	// InitKaiming draws A from U(−1/√in, 1/√in): PyTorch's kaiming_uniform(a=√5), Hugging Face's
	// default.
	InitKaiming = "kaiming"
	// InitGaussian draws A from N(0, (1/r)²), Hugging Face's "gaussian" option.
	InitGaussian = "gaussian"
)

// Config configures LoRA. Start from DefaultConfig: the defaults named below are its values,
// and New rejects a zero Rank or Alpha rather than guessing.
type Config struct {
	// Rank r of the update. Default 8. Must be > 0.
	Rank int `json:"r"`
	// Alpha scales the update by Alpha/Rank. Default 8 (= Rank). Must be > 0.
	Alpha float64 `json:"lora_alpha"`
	// Dropout applied to the input of the LoRA path while training, in [0, 1). Default 0.
	Dropout float64 `json:"lora_dropout"`
	// TargetModules selects the layers to adapt (Hugging Face semantics, see peft.Targets).
	// Default: q_proj and v_proj, Hugging Face's default for Llama models.
	TargetModules peft.Targets `json:"target_modules"`
	// RankPattern overrides Rank for the layers a key matches (Hugging Face's rank_pattern: a
	// regular expression matching the end of the path; the first matching key wins, see
	// peft.Patterns).
	RankPattern peft.Patterns[int] `json:"rank_pattern,omitempty"`
	// AlphaPattern overrides Alpha the same way.
	AlphaPattern peft.Patterns[float64] `json:"alpha_pattern,omitempty"`
	// UseRSLoRA scales by Alpha/√Rank (rank-stabilized LoRA) instead of Alpha/Rank.
	UseRSLoRA bool `json:"use_rslora"`
	// InitA is how A starts: InitKaiming (default) or InitGaussian. B always starts at zero.
	InitA string `json:"init_lora_weights"`
	// ModulesToSave lists modules of the base model trained and saved in full besides the
	// adapters, such as a new classifier head ("score"). Default none.
	ModulesToSave []string `json:"modules_to_save,omitempty"`
	// UseDoRA trains a magnitude per output column besides A and B: DoRA (PEFT's use_dora).
	// Default false.
	UseDoRA bool `json:"use_dora,omitempty"`
	// Seed of A's random initialization. Default 0.
	Seed uint64 `json:"seed"`
}

// DefaultConfig returns rank 8, alpha 8, no dropout, targets q_proj and v_proj, Kaiming init.
func DefaultConfig() Config {
	return Config{Rank: 8, Alpha: 8, TargetModules: peft.TargetNames("q_proj", "v_proj"), InitA: InitKaiming}
}

// Validate checks the configuration, naming the first field that is wrong.
func (c Config) Validate() error {
	if c.Rank <= 0 {
		return fmt.Errorf("lora: rank must be > 0, got %d", c.Rank)
	}
	if !(c.Alpha > 0) {
		return fmt.Errorf("lora: alpha must be > 0, got %g", c.Alpha)
	}
	if !(c.Dropout >= 0 && c.Dropout < 1) {
		return fmt.Errorf("lora: dropout must be in [0, 1), got %g", c.Dropout)
	}
	if c.InitA != InitKaiming && c.InitA != InitGaussian {
		return fmt.Errorf("lora: unknown init %q for A (want %q or %q)", c.InitA, InitKaiming, InitGaussian)
	}
	if err := c.TargetModules.Validate(); err != nil {
		return fmt.Errorf("lora: %w", err)
	}
	for _, p := range c.RankPattern {
		if p.Value <= 0 {
			return fmt.Errorf("lora: rank_pattern %q: rank must be > 0, got %d", p.Key, p.Value)
		}
	}
	for _, p := range c.AlphaPattern {
		if !(p.Value > 0) {
			return fmt.Errorf("lora: alpha_pattern %q: alpha must be > 0, got %g", p.Key, p.Value)
		}
	}
	if err := c.RankPattern.Validate("lora: rank_pattern"); err != nil {
		return err
	}
	return c.AlphaPattern.Validate("lora: alpha_pattern")
}

// LoRA is the LoRA method. It implements peft.Method, peft.LinearHook and peft.Merger.
type LoRA struct {
	cfg     Config
	targets map[string]*target  // by layer path
	order   []*target           // model order
	modules []*context.Variable // ModulesToSave's variables
	layout  *peft.Layout        // the model's, from Init
	merge   peft.WeightMerge
	// baseWeights gives a layer's base weights [in, out], where DoRA's magnitudes start from.
	baseWeights func(ctx *context.Context, layer *peft.LinearLayer) ([]float32, error)
}

// target is one adapted layer.
type target struct {
	layer     *peft.LinearLayer
	rank      int
	scale     float64
	a, b      *context.Variable
	magnitude *context.Variable // DoRA's m [out]; nil without DoRA
}

// New returns LoRA with cfg, or an error naming what is wrong with it.
func New(cfg Config) (*LoRA, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &LoRA{cfg: cfg}, nil
}

// Name implements peft.Method.
func (l *LoRA) Name() string { return "lora" }

// Config implements peft.Method.
func (l *LoRA) Config() any { return l.cfg }

// SetBaseWeights makes Init start DoRA's magnitudes from the weights fn returns ([in, out],
// row-major) instead of the layer's own float32 weights: for methods that compute the base output
// from other weights, such as QLoRA's dequantized 4-bit ones. Call it before Init.
func (l *LoRA) SetBaseWeights(fn func(ctx *context.Context, layer *peft.LinearLayer) ([]float32, error)) {
	l.baseWeights = fn
}

// layerWeights returns the base weights of layer, [in, out] row-major.
func layerWeights(ctx *context.Context, layer *peft.LinearLayer) ([]float32, error) {
	w := layer.Weights(ctx)
	if w == nil {
		return nil, fmt.Errorf("layer %s has no float32 weights", layer.Path)
	}
	return peft.Float32s(w)
}

// Init implements peft.Method: it selects the target layers and creates A and B for each (and
// DoRA's magnitude, the norms of the base weights' columns).
func (l *LoRA) Init(ctx *context.Context, layout *peft.Layout) error {
	selected, err := l.cfg.TargetModules.Select(layout)
	if err != nil {
		return err
	}
	if l.modules, err = peft.ModulesToSave(layout, l.cfg.ModulesToSave); err != nil {
		return fmt.Errorf("lora: %w", err)
	}
	baseWeights := l.baseWeights
	if baseWeights == nil {
		baseWeights = layerWeights
	}
	var magnitudes [][]float32
	if l.cfg.UseDoRA { // read every base weight before creating anything
		for _, layer := range selected {
			w, err := baseWeights(ctx, layer)
			if err != nil {
				return fmt.Errorf("lora: DoRA's magnitude of %s: %w", layer.Path, err)
			}
			magnitudes = append(magnitudes, columnNorms(w, layer.In, layer.Out))
		}
	}
	rng := peft.NewRand(l.cfg.Seed)
	l.targets = map[string]*target{}
	l.order = nil
	var oversized []string
	for _, layer := range selected { // refuse an absurd rank before allocating anything
		rank, _, _ := l.cfg.Resolve(layer.Path)
		if err := peft.CheckRank(layer, rank); err != nil {
			return fmt.Errorf("lora: %w", err)
		}
	}
	for i, layer := range selected {
		rank, _, scale := l.cfg.Resolve(layer.Path)
		if rank > min(layer.In, layer.Out) {
			oversized = append(oversized, fmt.Sprintf("%s (r=%d, min(in, out)=%d)", layer.Path, rank, min(layer.In, layer.Out)))
		}
		var aValues []float32
		if l.cfg.InitA == InitGaussian {
			aValues = peft.Normal(rng, layer.In*rank, 1/float64(rank))
		} else {
			aValues = peft.Uniform(rng, layer.In*rank, 1/math.Sqrt(float64(layer.In)))
		}
		scope := ctx.InAbsPath(layer.Scope).In("lora")
		t := &target{
			layer: layer, rank: rank, scale: scale,
			a: peft.NewVariable(scope, "A", aValues, layer.In, rank),
			b: peft.NewVariable(scope, "B", make([]float32, rank*layer.Out), rank, layer.Out),
		}
		if magnitudes != nil {
			t.magnitude = peft.NewVariable(scope, "magnitude", magnitudes[i], layer.Out)
		}
		l.targets[layer.Path] = t
		l.order = append(l.order, t)
	}
	l.layout = layout
	if len(oversized) > 0 {
		// Allowed, as in PEFT, but the extra rank is wasted parameters: say so once.
		log.Printf("lora: the rank exceeds min(in, out) on %d layer(s), whose update cannot have more rank than that: %s",
			len(oversized), strings.Join(oversized[:min(3, len(oversized))], ", "))
	}
	return nil
}

// Resolve returns the rank, alpha and scale of the layer at path, after rank_pattern,
// alpha_pattern and use_rslora.
func (c Config) Resolve(path string) (rank int, alpha, scale float64) {
	rank, alpha = c.Rank, c.Alpha
	if r, found := c.RankPattern.Lookup(path); found {
		rank = r
	}
	if a, found := c.AlphaPattern.Lookup(path); found {
		alpha = a
	}
	scale = alpha / float64(rank)
	if c.UseRSLoRA {
		scale = alpha / math.Sqrt(float64(rank))
	}
	return rank, alpha, scale
}

// Targets lists the paths of the adapted layers, in model order.
func (l *LoRA) Targets() []string {
	paths := make([]string, len(l.order))
	for i, t := range l.order {
		paths[i] = t.layer.Path
	}
	return paths
}

// Rank returns the rank used for the layer at path (after rank_pattern), or 0 if it is not adapted.
func (l *LoRA) Rank(path string) int {
	if t := l.targets[path]; t != nil {
		return t.rank
	}
	return 0
}

// Trainable implements peft.Method: A and B of every target (and DoRA's magnitude), and the
// modules to save.
func (l *LoRA) Trainable(*context.Context) []peft.TrainableVariable {
	vars := make([]*context.Variable, 0, 3*len(l.order)+len(l.modules))
	for _, t := range l.order {
		vars = append(vars, t.a, t.b)
		if t.magnitude != nil {
			vars = append(vars, t.magnitude)
		}
	}
	return peft.TrainAll(append(vars, l.modules...)...)
}

// State implements peft.Method: what Trainable lists.
func (l *LoRA) State(ctx *context.Context) []*context.Variable {
	return peft.VariablesOf(l.Trainable(ctx))
}

// Linear implements peft.LinearHook: base output plus s·(dropout(x)·A)·B on target layers (with
// DoRA, the output of m·(W + s·A·B)/‖W + s·A·B‖).
func (l *LoRA) Linear(ctx *context.Context, layer *peft.LinearLayer, x *graph.Node) *graph.Node {
	return l.Adapt(ctx, layer, x, layer.Base(ctx, x), nil)
}

// Adapt returns the output of layer for input x given its base output y = x·W + b: y plus
// s·(dropout(x)·A)·B, or with DoRA y + (g − 1)·(x·W) + g·s·(x·A)·B with g = m/‖W + s·A·B‖ per
// output column, as PEFT computes it (under dropout x·W is recomputed from the dropped input). It
// returns y unchanged when the layer is not adapted or the update is merged into its weights.
// Methods that compute the base output their own way (QLoRA over a quantized weight) call it with
// theirs; weights is the W [in, out] that y was computed with, needed by DoRA alone (nil: the
// layer's own weights).
func (l *LoRA) Adapt(ctx *context.Context, layer *peft.LinearLayer, x, y, weights *graph.Node) *graph.Node {
	t := l.targets[layer.Path]
	if t == nil || l.merge.Merged() {
		return y
	}
	g := x.Graph()
	in := layers.DropoutStatic(ctx.In("lora"), x, l.cfg.Dropout)
	a, b := t.a.ValueGraph(g), t.b.ValueGraph(g)
	update := graph.MulScalar(peft.MatMulLast(peft.MatMulLast(in, a), b), t.scale)
	if t.magnitude == nil {
		return graph.Add(y, update)
	}
	if weights == nil {
		weights = layer.Weights(ctx).ValueGraph(g)
	}
	// g = m / ‖W + s·A·B‖, a constant to the gradient (DoRA's section 4.3, PEFT).
	direction := graph.Add(weights, graph.MulScalar(graph.Dot(a, b), t.scale))
	norm := graph.Sqrt(graph.ReduceSum(graph.Square(direction), 0))
	gain := graph.Div(t.magnitude.ValueGraph(g), graph.StopGradient(norm))
	gain = graph.ExpandLeftToRank(gain, y.Rank())
	var base *graph.Node // x·W without the bias
	if in == x {
		base = y
		if bias := layer.Biases(ctx); bias != nil {
			base = graph.Sub(y, graph.ExpandLeftToRank(bias.ValueGraph(g), y.Rank()))
		}
	} else {
		base = peft.MatMulLast(in, weights)
	}
	return graph.Add(y, graph.Add(graph.Mul(graph.AddScalar(gain, -1), base), graph.Mul(gain, update)))
}

// columnNorms returns the L2 norm of each column of w [in, out], row-major: DoRA's ‖·‖.
func columnNorms(w []float32, in, out int) []float32 {
	sums := make([]float64, out)
	for i := range in {
		for j, v := range w[i*out : (i+1)*out] {
			sums[j] += float64(v) * float64(v)
		}
	}
	norms := make([]float32, out)
	for j, s := range sums {
		norms[j] = float32(math.Sqrt(s))
	}
	return norms
}

// Merge implements peft.Merger: W ← W + s·A·B for every target (with DoRA,
// m·(W + s·A·B)/‖W + s·A·B‖), all or nothing. The base weights are kept aside so that Unmerge
// restores them bit for bit.
func (l *LoRA) Merge(ctx *context.Context) error {
	layers := make([]*peft.LinearLayer, len(l.order))
	for i, t := range l.order {
		layers[i] = t.layer
	}
	if err := l.merge.Replace(ctx, layers, func(i int, w, _ []float32) ([]float32, []float32, error) {
		w, err := l.merged(l.order[i], w)
		return w, nil, err
	}); err != nil {
		return fmt.Errorf("lora: %w", err)
	}
	return nil
}

// MergedWeights returns what Merge makes of the layer at path when its base weights are w
// ([in, out], row-major): w + s·A·B, or with DoRA m·(w + s·A·B)/‖w + s·A·B‖ per output column
// (PEFT's merge, norms in float64). Methods that keep the base weights elsewhere (QLoRA) merge
// with it.
func (l *LoRA) MergedWeights(path string, w []float32) ([]float32, error) {
	t := l.targets[path]
	if t == nil {
		return nil, fmt.Errorf("lora: layer %q is not adapted (adapted: %v)", path, l.Targets())
	}
	return l.merged(t, w)
}

func (l *LoRA) merged(t *target, w []float32) ([]float32, error) {
	in, out := t.layer.In, t.layer.Out
	if len(w) != in*out {
		return nil, fmt.Errorf("lora: %s: base weights have %d values, the layer %d×%d", t.layer.Path, len(w), in, out)
	}
	d, err := l.delta(t)
	if err != nil {
		return nil, err
	}
	for k := range d {
		d[k] += w[k]
	}
	if t.magnitude == nil {
		return d, nil
	}
	m, err := peft.Float32s(t.magnitude)
	if err != nil {
		return nil, err
	}
	norms := columnNorms(d, in, out)
	for i := range in {
		for j := range out {
			d[i*out+j] = float32(float64(m[j]) / float64(norms[j]) * float64(d[i*out+j]))
		}
	}
	return d, nil
}

// factors returns A [in, r] and B [r, out], row-major.
func (t *target) factors() (a, b []float32, err error) {
	if a, err = peft.Float32s(t.a); err != nil {
		return nil, nil, err
	}
	b, err = peft.Float32s(t.b)
	return a, b, err
}

// delta returns s·A·B, [in, out] row-major.
func (l *LoRA) delta(t *target) ([]float32, error) {
	a, b, err := t.factors()
	if err != nil {
		return nil, err
	}
	return peft.LowRankProduct(a, t.layer.In, t.rank, nil, b, t.layer.Out, t.scale), nil
}

// Unmerge implements peft.Merger: it restores the base weights exactly as they were.
func (l *LoRA) Unmerge(ctx *context.Context) error {
	if err := l.merge.Unmerge(ctx); err != nil {
		return fmt.Errorf("lora: %w", err)
	}
	return nil
}

// Merged implements peft.Merger.
func (l *LoRA) Merged() bool { return l.merge.Merged() }

// Delta returns the update s·A·B ([in, out], row-major) of the layer at path: what Merge adds to
// its weights without DoRA (with DoRA, see MergedWeights).
func (l *LoRA) Delta(path string) ([]float32, error) {
	t := l.targets[path]
	if t == nil {
		return nil, fmt.Errorf("lora: layer %q is not adapted (adapted: %v)", path, l.Targets())
	}
	return l.delta(t)
}
