// Package ia3 implements (IA)³, "Infused Adapter by Inhibiting and Amplifying Inner Activations"
// (Liu et al. 2022, https://arxiv.org/abs/2205.05638), with Hugging Face PEFT's semantics: each
// selected linear layer gets one learned vector l that rescales an activation,
//
//	y = (x·W + b) ⊙ l     l of size out, for a target that is not a feedforward module
//	y = (x ⊙ l)·W + b     l of size in, for a target listed in FeedforwardModules
//
// with W and b frozen and only the vectors (and ModulesToSave) trained: one number per output (or
// input) feature of each target (0.45% of stories260K with the defaults). The vectors start
// at 1 (PEFT's init_ia3_weights), and multiplying by 1 is exact in floating point, so a fresh
// model computes bit for bit what the base model computes. Merge folds the vectors into the
// weights (W ⊙ l per output column, per input row for feedforward modules) for zero inference
// cost.
//
// Storage: l lives beside the layer's weights, as the variable "l" in the scope <layer>/ia3,
// shaped [out] or [in]; PEFT's ia3_l holds the same values shaped [out, 1] or [1, in].
// Our weights are [in, out] (GoMLX's layout, PyTorch's transposed), so PEFT's per-output-row
// scaling of its [out, in] weight is a per-column scaling of ours.
package ia3

import (
	"fmt"
	"log"
	"regexp"
	"slices"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/ml/context"

	"peft/peft"
)

// Config configures (IA)³. Start from DefaultConfig: the defaults named below are its values.
//
// PEFT's init_ia3_weights is not a field: false there draws the vectors from N(0, 1), which PEFT
// itself discourages (the model no longer starts at the base, its activations scaled by random
// signs); the vectors here always start at 1. A trained adapter saved with either loads.
type Config struct {
	// TargetModules selects the layers to adapt (Hugging Face semantics, see peft.Targets).
	// Default: k_proj, v_proj and down_proj, PEFT's default for Llama and Mistral models (for
	// Qwen2 and Qwen3 PEFT uses q_proj in place of k_proj).
	TargetModules peft.Targets `json:"target_modules"`
	// FeedforwardModules selects the targets whose vector scales their input instead of their
	// output, by PEFT's rule: a pattern must match a layer's whole path; a name matches a path
	// that ends with it (a plain suffix, unlike target_modules' names, which need a dot before
	// them: with pattern targets, "proj" here matches every "…_proj"). When both are lists, every
	// name here must also be a name of TargetModules (PEFT's rule). Init logs a line when none of
	// the targets is a feedforward module although some are named. The zero value means none.
	// Default: down_proj, PEFT's default for Llama models; with other targets set it too (or to
	// peft.Targets{}).
	FeedforwardModules peft.Targets `json:"feedforward_modules"`
	// ModulesToSave lists modules of the base model trained and saved in full besides the
	// vectors, such as a new classifier head ("score"). Default none.
	ModulesToSave []string `json:"modules_to_save,omitempty"`
}

// DefaultConfig returns PEFT's configuration for Llama models: targets k_proj, v_proj and
// down_proj, with down_proj a feedforward module.
func DefaultConfig() Config {
	return Config{
		TargetModules:      peft.TargetNames("k_proj", "v_proj", "down_proj"),
		FeedforwardModules: peft.TargetNames("down_proj"),
	}
}

// Validate checks the configuration, naming the first field that is wrong.
func (c Config) Validate() error {
	if err := c.TargetModules.Validate(); err != nil {
		return fmt.Errorf("ia3: target_modules: %w", err)
	}
	ff := c.FeedforwardModules
	if ff.IsZero() {
		return nil
	}
	if ff.Pattern == peft.AllLinear {
		return fmt.Errorf("ia3: feedforward_modules %q is not supported: PEFT reads it as a regular expression, which selects no layer; list the feedforward modules", ff.Pattern)
	}
	if err := ff.Validate(); err != nil {
		return fmt.Errorf("ia3: feedforward_modules: %w", err)
	}
	if len(ff.Names) > 0 && len(c.TargetModules.Names) > 0 {
		for _, name := range ff.Names {
			if !slices.Contains(c.TargetModules.Names, name) {
				return fmt.Errorf("ia3: feedforward_modules: %q is not in target_modules %q: every feedforward module must also be a target (PEFT's rule)",
					name, c.TargetModules.Names)
			}
		}
	}
	return nil
}

// feedforward returns the matcher of FeedforwardModules by PEFT's rule (re.fullmatch for a
// pattern, str.endswith for names). The configuration must be valid.
func (c Config) feedforward() func(path string) bool {
	ff := c.FeedforwardModules
	if ff.Pattern != "" {
		re := regexp.MustCompile("^(?:" + ff.Pattern + ")$")
		return re.MatchString
	}
	return func(path string) bool {
		for _, name := range ff.Names {
			if strings.HasSuffix(path, name) {
				return true
			}
		}
		return false
	}
}

// IA3 is the (IA)³ method. It implements peft.Method, peft.LinearHook, peft.Merger and
// peft.PEFTFormat.
type IA3 struct {
	cfg     Config
	targets map[string]*target  // by layer path
	order   []*target           // model order
	modules []*context.Variable // ModulesToSave's variables
	layout  *peft.Layout        // the model's, from Init
	merge   peft.WeightMerge
}

// target is one adapted layer.
type target struct {
	layer       *peft.LinearLayer
	feedforward bool              // l scales the input ([In]) rather than the output ([Out])
	l           *context.Variable // [In] or [Out]
}

// size is the length of the layer's vector.
func (t *target) size() int {
	if t.feedforward {
		return t.layer.In
	}
	return t.layer.Out
}

// New returns (IA)³ with cfg, or an error naming what is wrong with it.
func New(cfg Config) (*IA3, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &IA3{cfg: cfg}, nil
}

// Name implements peft.Method.
func (m *IA3) Name() string { return "ia3" }

// Config implements peft.Method.
func (m *IA3) Config() any { return m.cfg }

// Init implements peft.Method: it selects the target layers and creates each one's vector,
// filled with ones.
func (m *IA3) Init(ctx *context.Context, layout *peft.Layout) error {
	selected, err := m.cfg.TargetModules.Select(layout)
	if err != nil {
		return fmt.Errorf("ia3: %w", err)
	}
	if m.modules, err = peft.ModulesToSave(layout, m.cfg.ModulesToSave); err != nil {
		return fmt.Errorf("ia3: %w", err)
	}
	isFeedforward := m.cfg.feedforward()
	m.targets = map[string]*target{}
	m.order = nil
	feedforward := 0
	for _, layer := range selected {
		t := &target{layer: layer, feedforward: isFeedforward(layer.Path)}
		ones := make([]float32, t.size())
		for i := range ones {
			ones[i] = 1
		}
		t.l = peft.NewVariable(ctx.InAbsPath(layer.Scope).In("ia3"), "l", ones, len(ones))
		m.targets[layer.Path] = t
		m.order = append(m.order, t)
		if t.feedforward {
			feedforward++
		}
	}
	if feedforward == 0 && !m.cfg.FeedforwardModules.IsZero() {
		log.Printf("ia3: feedforward_modules %s select none of the %d targets, so every vector scales its layer's output", m.cfg.FeedforwardModules, len(selected))
	}
	m.layout = layout
	return nil
}

// Targets lists the paths of the adapted layers, in model order.
func (m *IA3) Targets() []string {
	paths := make([]string, len(m.order))
	for i, t := range m.order {
		paths[i] = t.layer.Path
	}
	return paths
}

// Feedforward reports whether the layer at path is adapted as a feedforward module (its vector
// scales the input).
func (m *IA3) Feedforward(path string) bool {
	t := m.targets[path]
	return t != nil && t.feedforward
}

// Trainable implements peft.Method: the vector of every target, and the modules to save.
func (m *IA3) Trainable(*context.Context) []peft.TrainableVariable {
	vars := make([]*context.Variable, 0, len(m.order)+len(m.modules))
	for _, t := range m.order {
		vars = append(vars, t.l)
	}
	return peft.TrainAll(append(vars, m.modules...)...)
}

// State implements peft.Method: what Trainable lists.
func (m *IA3) State(ctx *context.Context) []*context.Variable {
	return peft.VariablesOf(m.Trainable(ctx))
}

// Linear implements peft.LinearHook: the base output scaled by l, or the base output of the
// input scaled by l for feedforward modules; the base output alone on other layers and while
// merged.
func (m *IA3) Linear(ctx *context.Context, layer *peft.LinearLayer, x *graph.Node) *graph.Node {
	t := m.targets[layer.Path]
	if t == nil || m.merge.Merged() {
		return layer.Base(ctx, x)
	}
	l := t.l.ValueGraph(x.Graph())
	if l.DType() != x.DType() {
		l = graph.ConvertDType(l, x.DType())
	}
	if t.feedforward {
		return layer.Base(ctx, graph.Mul(x, graph.ExpandLeftToRank(l, x.Rank())))
	}
	y := layer.Base(ctx, x)
	return graph.Mul(y, graph.ExpandLeftToRank(l, y.Rank()))
}

// Merge implements peft.Merger: W ← W ⊙ l for every target, scaling the columns (outputs) of
// W [in, out], or its rows (inputs) for feedforward modules, and b ← b ⊙ l for the targets that
// are not feedforward modules, all or nothing: PEFT's float32 products. The base weights and
// biases are kept aside so that Unmerge restores them bit for bit.
func (m *IA3) Merge(ctx *context.Context) error {
	layers := make([]*peft.LinearLayer, len(m.order))
	for i, t := range m.order {
		layers[i] = t.layer
	}
	if err := m.merge.Replace(ctx, layers, func(i int, w, b []float32) ([]float32, []float32, error) {
		return m.order[i].scale(w, b)
	}); err != nil {
		return fmt.Errorf("ia3: %w", err)
	}
	return nil
}

// scale returns w ⊙ l and b ⊙ l for t's layer weights w ([in, out], row-major) and biases b (nil
// if none), changed in place: l[j] scales column j and b[j]; for a feedforward module l[i]
// scales row i, and the biases stay (nil is returned for them).
func (t *target) scale(w, b []float32) ([]float32, []float32, error) {
	l, err := peft.Float32s(t.l)
	if err != nil {
		return nil, nil, err
	}
	in, out := t.layer.In, t.layer.Out
	for i := range in {
		row := w[i*out : (i+1)*out]
		for j := range row {
			if t.feedforward {
				row[j] *= l[i]
			} else {
				row[j] *= l[j]
			}
		}
	}
	if t.feedforward {
		return w, nil, nil
	}
	for j := range b {
		b[j] *= l[j]
	}
	return w, b, nil
}

// Unmerge implements peft.Merger: it restores the base weights exactly as they were.
func (m *IA3) Unmerge(ctx *context.Context) error {
	if err := m.merge.Unmerge(ctx); err != nil {
		return fmt.Errorf("ia3: %w", err)
	}
	return nil
}

// Merged implements peft.Merger.
func (m *IA3) Merged() bool { return m.merge.Merged() }
