// Package adalora implements AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for
// Parameter-Efficient Fine-Tuning"), following Hugging Face PEFT's tuners/adalora. Each selected
// linear layer computes
//
//	y = x·W + s·((dropout(x)·Qᵀ)∘Λ)·Pᵀ,   s = Alpha/(InitRank + 1e-5)
//
// with W frozen and P [out, r], Λ [r], Q [r, in] trained (r = InitRank). The update P·diag(Λ)·Q
// has the form of an SVD: during training an allocator keeps only the most important "singular
// values" Λ_i across all adapted matrices, shrinking the total rank from InitRank per matrix to
// TargetRank per matrix on average, so the rank goes where the task needs it.
//
// # Initialization
//
// Λ = 0 and P, Q ~ N(0, 0.02²), so a fresh model computes exactly what the base model computes.
//
// # Importance and allocation (after each optimizer step t, counted from 1)
//
// For every entry p of P, Λ and Q, with g = ∂L/∂p the step's gradient and p the value after the
// optimizer step (Hugging Face calls update_and_allocate after optimizer.step()):
//
//	I = |p·g|,  Ī ← β1·Ī + (1−β1)·I,  Ū ← β2·Ū + (1−β2)·|I − Ī|,  s = Ī·Ū
//
// and the score of triplet i of a matrix is S_i = s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki). The
// budget b(t) (total kept singular values over all matrices; b(0) = n·InitRank, b_T =
// n·TargetRank for n matrices, T = TotalSteps) follows a cubic schedule (Config.Budget):
//
//	t ≤ TInit:               b = b(0), no masking
//	TInit < t < T − TFinal:  b = ⌊(b(0) − b_T)·(1 − (t − TInit)/(T − TFinal − TInit))³⌋ + b_T,
//	                         masking when t is a multiple of DeltaT
//	t = T − TFinal:          b = b_T, masking, and the rank pattern is frozen
//	t > T − TFinal:          the frozen mask is applied again after every step
//
// Masking keeps exactly b triplets, the highest-scoring ones over all matrices (ties are broken
// toward the later matrix and singular value; Hugging Face masks every score ≤ the k-th smallest,
// which can mask more than asked on ties), and sets the others' Λ_i to 0. The importance averages
// are updated for t < T − TFinal only, as in Hugging Face.
//
// As in Hugging Face, masking writes zeros into Λ itself and the forward uses Λ as it is: between
// two allocations (DeltaT > 1) the optimizer may regrow a masked Λ_i, which then acts until the
// next allocation, and a masked triplet whose gradient grows can win its place back. From
// T − TFinal on, the mask is applied after every step, so the model the trainer ends with (and
// saves) has exactly the frozen rank pattern.
//
// # Orthogonal regularization
//
// In training graphs the loss gets OrthRegWeight·mean(‖QQᵀ − I‖_F, ‖PᵀP − I‖_F), the mean over the
// 2n factor matrices P and Q (Hugging Face divides the sum by the number of lora_A and lora_B
// matrices).
//
// # Storage and the Hugging Face mapping
//
// Per adapted layer, in the scope <layer>/adalora, in GoMLX's [in, out] layout:
//
//	A [in, r]  = Qᵀ   (Hugging Face lora_A.weight [r, in] = Aᵀ)
//	E [r]      = Λ    (lora_E [r, 1])
//	B [r, out] = Pᵀ   (lora_B.weight [out, r] = Bᵀ)
//	mask [r]   = 1 for kept singular values, 0 for masked ones (Hugging Face keeps this as the
//	             config's rank_pattern, a list of booleans per lora_E)
//
// so the forward is x·A·diag(E)·B·s. State (what Save writes) is A, E, B and mask of every layer
// plus ModulesToSave; RankPattern reads the kept rank per layer from the masks, so a saved adapter
// carries its rank pattern. Hugging Face's ranknum (InitRank, fixed) is implied by the config. The
// allocator's bookkeeping (last gradients, Ī, Ū: three more copies of the adapter, as Hugging
// Face's ipt, exp_avg_ipt and exp_avg_unc) lives in <layer>/adalora/allocator and is not saved,
// as in Hugging Face.
//
// # Cost
//
// The train step keeps the gradients of A, E and B in the bookkeeping variables. AfterStep then
// runs small compiled graphs of its own on the model's backend: the importance update (which
// returns the n·r triplet scores, the only values copied to the host), and the masking (the mask
// goes back as one [n·r] tensor). The selection itself is a sort of n·r scores on the host.
//
// # Differences from Hugging Face
//
//   - The importance uses the gradients before the trainer's global-norm clipping (Hugging Face's
//     Trainer clips p.grad in place before update_and_allocate reads it). Clipping scales all
//     gradients of a step by one factor, so it changes no ranking within a step, only the weight
//     of the step in the averages.
//   - Ties in the allocation are broken so that exactly the budget is kept.
//   - The configuration has no rank_pattern field: the pattern is in the saved masks, and the
//     configuration stays what the user gave, so a fresh model with it loads a trained adapter.
package adalora

import (
	"fmt"
	"math"
	"math/big"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/gomlx/gomlx/backends"
	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gomlx/pkg/ml/layers"
	"github.com/gomlx/gopjrt/dtypes"

	"peft/peft"
	"peft/peft/backend"
)

// Config configures AdaLoRA. Start from DefaultConfig and set TotalSteps (required): the defaults
// named below are DefaultConfig's values (Hugging Face's), and New rejects zero values rather than
// guessing.
type Config struct {
	// InitRank is the rank every adapted matrix starts with. Default 12. Must be > 0.
	InitRank int `json:"init_r"`
	// TargetRank is the average rank per matrix at the end of the budget schedule. Default 8.
	// Must be > 0 and ≤ InitRank.
	TargetRank int `json:"target_r"`
	// TInit is the number of warm-up steps before any masking. Default 0. Must be ≥ 0.
	TInit int `json:"tinit"`
	// TFinal is the number of final steps trained with the frozen rank pattern. Default 0.
	// Must be ≥ 0, and TInit < TotalSteps − TFinal (there must be a budgeting phase).
	TFinal int `json:"tfinal"`
	// DeltaT is the number of steps between two allocations during the budgeting phase.
	// Default 1. Must be ≥ 1.
	DeltaT int `json:"deltaT"`
	// Beta1 is the smoothing factor of the importance average Ī. Default 0.85. In (0, 1).
	Beta1 float64 `json:"beta1"`
	// Beta2 is the smoothing factor of the uncertainty average Ū. Default 0.85. In (0, 1).
	Beta2 float64 `json:"beta2"`
	// OrthRegWeight is γ, the weight of the orthogonal regularization. Default 0.5. Must be ≥ 0
	// (as in Hugging Face; 0 turns it off).
	OrthRegWeight float64 `json:"orth_reg_weight"`
	// TotalSteps is T, the number of training steps the budget schedule spans. Required (> 0);
	// train for this many steps.
	TotalSteps int `json:"total_step"`
	// Alpha scales the update by Alpha/(InitRank + 1e-5). Default 8. Must be > 0.
	Alpha float64 `json:"lora_alpha"`
	// Dropout applied to the input of the adapter path while training, in [0, 1). Default 0.
	Dropout float64 `json:"lora_dropout"`
	// TargetModules selects the layers to adapt (Hugging Face semantics, see peft.Targets).
	// Default: q_proj and v_proj, Hugging Face's AdaLoRA default for Llama models.
	TargetModules peft.Targets `json:"target_modules"`
	// ModulesToSave lists modules of the base model trained and saved in full besides the
	// adapters, such as a new classifier head ("score"). Default none.
	ModulesToSave []string `json:"modules_to_save,omitempty"`
	// Seed of the random initialization of P and Q. Default 0.
	Seed uint64 `json:"seed"`
}

// DefaultConfig returns Hugging Face's AdaLoRA defaults: initial rank 12, target rank 8, no
// warm-up or final phase, allocation every step, β1 = β2 = 0.85, γ = 0.5, alpha 8, no dropout,
// targets q_proj and v_proj. TotalSteps is left 0: set it to the number of training steps.
func DefaultConfig() Config {
	return Config{
		InitRank: 12, TargetRank: 8, DeltaT: 1, Beta1: 0.85, Beta2: 0.85, OrthRegWeight: 0.5,
		Alpha: 8, TargetModules: peft.TargetNames("q_proj", "v_proj"),
	}
}

// Validate checks the configuration, naming the first field that is wrong.
func (c Config) Validate() error {
	switch {
	case c.InitRank <= 0:
		return fmt.Errorf("adalora: init_r (initial rank) must be > 0, got %d", c.InitRank)
	case c.TargetRank <= 0:
		return fmt.Errorf("adalora: target_r (target rank) must be > 0, got %d", c.TargetRank)
	case c.TargetRank > c.InitRank:
		return fmt.Errorf("adalora: target_r %d is above init_r %d: the budget only shrinks", c.TargetRank, c.InitRank)
	case !(c.Alpha > 0) || math.IsInf(c.Alpha, 0):
		return fmt.Errorf("adalora: lora_alpha must be > 0 and finite, got %g", c.Alpha)
	case !(c.Dropout >= 0 && c.Dropout < 1):
		return fmt.Errorf("adalora: lora_dropout must be in [0, 1), got %g", c.Dropout)
	case !(c.Beta1 > 0 && c.Beta1 < 1):
		return fmt.Errorf("adalora: beta1 must be in (0, 1), got %g", c.Beta1)
	case !(c.Beta2 > 0 && c.Beta2 < 1):
		return fmt.Errorf("adalora: beta2 must be in (0, 1), got %g", c.Beta2)
	case !(c.OrthRegWeight >= 0) || math.IsInf(c.OrthRegWeight, 0):
		return fmt.Errorf("adalora: orth_reg_weight must be ≥ 0 and finite, got %g", c.OrthRegWeight)
	case c.TotalSteps <= 0:
		return fmt.Errorf("adalora: total_step is required and must be > 0 (the number of training steps), got %d", c.TotalSteps)
	case c.TInit < 0:
		return fmt.Errorf("adalora: tinit must be ≥ 0, got %d", c.TInit)
	case c.TFinal < 0:
		return fmt.Errorf("adalora: tfinal must be ≥ 0, got %d", c.TFinal)
	case c.DeltaT < 1:
		return fmt.Errorf("adalora: deltaT must be ≥ 1, got %d", c.DeltaT)
	case c.TInit >= c.TotalSteps-c.TFinal:
		return fmt.Errorf("adalora: tinit %d must be < total_step %d − tfinal %d = %d: the schedule leaves no budgeting phase",
			c.TInit, c.TotalSteps, c.TFinal, c.TotalSteps-c.TFinal)
	}
	if err := c.TargetModules.Validate(); err != nil {
		return fmt.Errorf("adalora: %w", err)
	}
	return nil
}

// Budget returns the total number of singular values kept over matrices adapted matrices after
// step (counted from 1), and whether the schedule masks at that step: Hugging Face's
// RankAllocator.budget_schedule, with the same float64 arithmetic, so the integer budgets agree
// with it at every step. (AdaLoRA also masks at T − TFinal whatever DeltaT says, and applies the
// frozen mask after it: see the package comment.)
func (c Config) Budget(matrices, step int) (budget int, mask bool) {
	initial, target := c.InitRank*matrices, c.TargetRank*matrices
	switch {
	case step <= c.TInit:
		return initial, false
	case step > c.TotalSteps-c.TFinal:
		return target, true
	}
	mul := 1 - float64(step-c.TInit)/float64(c.TotalSteps-c.TFinal-c.TInit)
	budget = int(float64(initial-target)*cube(mul) + float64(target))
	return budget, step%c.DeltaT == 0
}

// cube returns x³ correctly rounded, as C's pow(x, 3) (which Python's x**3 calls) returns it:
// x·x·x rounds twice and can land on the other side of an integer budget.
func cube(x float64) float64 {
	b := new(big.Float).SetPrec(200).SetFloat64(x)
	b.Mul(b, new(big.Float).SetPrec(200).SetFloat64(x))
	b.Mul(b, new(big.Float).SetPrec(200).SetFloat64(x))
	f, _ := b.Float64()
	return f
}

// AdaLoRA is the AdaLoRA method. It implements peft.Method, peft.LinearHook, peft.LossHook,
// peft.GradientHook, peft.StepHook and peft.Merger.
type AdaLoRA struct {
	cfg     Config
	scale   float64
	targets map[string]*target  // by layer path
	order   []*target           // model order
	modules []*context.Variable // ModulesToSave's variables
	layout  *peft.Layout        // the model's, from Init
	merge   peft.WeightMerge

	mu        sync.Mutex
	backend   backends.Backend // the backend of the graphs that ran the method
	ctx       *context.Context // the context the allocator's executors were built for
	scoreExec *context.Exec    // updates Ī, Ū and returns the triplet scores
	maskExec  *context.Exec    // writes the masks and zeroes the masked Λ entries
	reapply   *context.Exec    // zeroes the Λ entries the masks hold as masked
	scores    []float32        // the last triplet scores, concatenated in model order
	pattern   map[string]int   // the rank pattern last reported to onChange
	onChange  func(RankEvent)
}

// target is one adapted layer.
type target struct {
	layer    *peft.LinearLayer
	offset   int               // of its singular values in the concatenated scores and masks
	a, e, b  *context.Variable // Qᵀ [in, r], Λ [r], Pᵀ [r, out]
	mask     *context.Variable // [r]
	grads    [3]*context.Variable
	ipt, unc [3]*context.Variable // Ī and Ū of A, E, B
}

// params lists A, E and B, in the order of grads, ipt and unc.
func (t *target) params() [3]*context.Variable { return [3]*context.Variable{t.a, t.e, t.b} }

// RankEvent reports an allocation that changed the rank pattern (or the final one), passed to the
// function given to OnRankPatternChange.
type RankEvent struct {
	// Step is the training step (from 1) whose allocation changed the pattern.
	Step int
	// Budget is the number of singular values kept over all matrices: the sum of Pattern.
	Budget int
	// Pattern is the kept rank of each adapted layer, by path.
	Pattern map[string]int
	// Final is true for the allocation at TotalSteps − TFinal, which freezes the pattern.
	Final bool
}

// String formats the event as one log line, layers in sorted order.
func (e RankEvent) String() string {
	paths := make([]string, 0, len(e.Pattern))
	for p := range e.Pattern {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	parts := make([]string, len(paths))
	for i, p := range paths {
		parts[i] = fmt.Sprintf("%s:%d", p, e.Pattern[p])
	}
	final := ""
	if e.Final {
		final = " (final)"
	}
	return fmt.Sprintf("adalora step %d: budget %d%s, rank pattern %s", e.Step, e.Budget, final, strings.Join(parts, " "))
}

// New returns AdaLoRA with cfg, or an error naming what is wrong with it.
func New(cfg Config) (*AdaLoRA, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &AdaLoRA{cfg: cfg, scale: cfg.Alpha / (float64(cfg.InitRank) + 1e-5)}, nil
}

// Name implements peft.Method.
func (a *AdaLoRA) Name() string { return "adalora" }

// Config implements peft.Method.
func (a *AdaLoRA) Config() any { return a.cfg }

// Scale is the factor of the update, Alpha/(InitRank + 1e-5), constant while ranks are masked.
func (a *AdaLoRA) Scale() float64 { return a.scale }

// OnRankPatternChange sets fn to be called (from the training loop) whenever an allocation
// changes the rank pattern, for logging or plotting; nil turns it off. The first allocation and
// the final one (at TotalSteps − TFinal, RankEvent.Final) are always reported.
func (a *AdaLoRA) OnRankPatternChange(fn func(RankEvent)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.onChange = fn
}

// Init implements peft.Method: it selects the target layers and creates P, Λ, Q, the mask and
// the allocator's bookkeeping for each.
func (a *AdaLoRA) Init(ctx *context.Context, layout *peft.Layout) error {
	selected, err := a.cfg.TargetModules.Select(layout)
	if err != nil {
		return err
	}
	if a.modules, err = peft.ModulesToSave(layout, a.cfg.ModulesToSave); err != nil {
		return fmt.Errorf("adalora: %w", err)
	}
	for _, layer := range selected { // refuse an absurd rank before allocating anything
		if err := peft.CheckRank(layer, a.cfg.InitRank); err != nil {
			return fmt.Errorf("adalora: %w", err)
		}
	}
	rng := peft.NewRand(a.cfg.Seed)
	r := a.cfg.InitRank
	a.targets = map[string]*target{}
	a.order = nil
	ones := func() []float32 {
		v := make([]float32, r)
		for i := range v {
			v[i] = 1
		}
		return v
	}
	for i, layer := range selected {
		scope := ctx.InAbsPath(layer.Scope).In("adalora")
		t := &target{
			layer: layer, offset: i * r,
			a:    peft.NewVariable(scope, "A", peft.Normal(rng, layer.In*r, 0.02), layer.In, r),
			e:    peft.NewVariable(scope, "E", make([]float32, r), r),
			b:    peft.NewVariable(scope, "B", peft.Normal(rng, r*layer.Out, 0.02), r, layer.Out),
			mask: peft.NewVariable(scope, "mask", ones(), r),
		}
		book := scope.In("allocator")
		for k, p := range t.params() {
			dims := p.Shape().Dimensions
			size := p.Shape().Size()
			t.grads[k] = peft.NewVariable(book, p.Name()+"_grad", make([]float32, size), dims...)
			t.ipt[k] = peft.NewVariable(book, p.Name()+"_ipt", make([]float32, size), dims...)
			t.unc[k] = peft.NewVariable(book, p.Name()+"_unc", make([]float32, size), dims...)
		}
		a.targets[layer.Path] = t
		a.order = append(a.order, t)
	}
	a.layout = layout
	return nil
}

// Targets lists the paths of the adapted layers, in model order.
func (a *AdaLoRA) Targets() []string {
	paths := make([]string, len(a.order))
	for i, t := range a.order {
		paths[i] = t.layer.Path
	}
	return paths
}

// Trainable implements peft.Method: A, E and B of every target, and the modules to save.
func (a *AdaLoRA) Trainable(*context.Context) []peft.TrainableVariable {
	vars := make([]*context.Variable, 0, 3*len(a.order)+len(a.modules))
	for _, t := range a.order {
		vars = append(vars, t.a, t.e, t.b)
	}
	return peft.TrainAll(append(vars, a.modules...)...)
}

// State implements peft.Method: A, E, B and the mask of every target (the mask carries the rank
// pattern), then the modules to save.
func (a *AdaLoRA) State(*context.Context) []*context.Variable {
	vars := make([]*context.Variable, 0, 4*len(a.order)+len(a.modules))
	for _, t := range a.order {
		vars = append(vars, t.a, t.e, t.b, t.mask)
	}
	return append(vars, a.modules...)
}

// noteBackend remembers the backend the method's graphs run on, for the allocator's executors.
func (a *AdaLoRA) noteBackend(b backends.Backend) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.backend == nil {
		a.backend = b
	}
}

// Linear implements peft.LinearHook: base output plus s·((dropout(x)·A)∘E)·B on target layers.
func (a *AdaLoRA) Linear(ctx *context.Context, layer *peft.LinearLayer, x *graph.Node) *graph.Node {
	y := layer.Base(ctx, x)
	t := a.targets[layer.Path]
	if t == nil || a.merge.Merged() {
		return y
	}
	g := x.Graph()
	a.noteBackend(g.Backend())
	in := layers.DropoutStatic(ctx.In("adalora"), x, a.cfg.Dropout)
	h := peft.MatMulLast(in, t.a.ValueGraph(g))
	h = graph.Mul(h, graph.ExpandLeftToRank(t.e.ValueGraph(g), h.Rank()))
	update := peft.MatMulLast(h, t.b.ValueGraph(g))
	return graph.Add(y, graph.MulScalar(update, a.scale))
}

// Loss implements peft.LossHook: OrthRegWeight·mean over the factor matrices of
// ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F (QQᵀ = AᵀA and PᵀP = BBᵀ in our layout).
func (a *AdaLoRA) Loss(_ *context.Context, g *graph.Graph) *graph.Node {
	if len(a.order) == 0 || a.cfg.OrthRegWeight == 0 {
		return nil
	}
	r := a.cfg.InitRank
	eye := make([]float32, r*r)
	for i := range r {
		eye[i*r+i] = 1
	}
	identity := graph.Const(g, tensors.FromFlatDataAndDimensions(eye, r, r))
	total := graph.Scalar(g, dtypes.Float32, 0)
	for _, t := range a.order {
		av, bv := t.a.ValueGraph(g), t.b.ValueGraph(g)
		qqt := graph.Einsum("ir,is->rs", av, av)
		ptp := graph.Einsum("ro,so->rs", bv, bv)
		total = graph.Add(total, frobenius(graph.Sub(qqt, identity)))
		total = graph.Add(total, frobenius(graph.Sub(ptp, identity)))
	}
	return graph.MulScalar(total, a.cfg.OrthRegWeight/float64(2*len(a.order)))
}

// frobenius returns ‖x‖_F with a zero (not NaN) gradient at x = 0.
func frobenius(x *graph.Node) *graph.Node {
	sq := graph.ReduceAllSum(graph.Square(x))
	positive := graph.GreaterThan(sq, graph.ZerosLike(sq))
	safe := graph.Where(positive, sq, graph.OnesLike(sq))
	return graph.Where(positive, graph.Sqrt(safe), graph.ZerosLike(sq))
}

// ObserveGradients implements peft.GradientHook: it keeps the step's gradients of A, E and B, for
// the importance update that AfterStep runs on the values after the optimizer step.
func (a *AdaLoRA) ObserveGradients(_ *context.Context, g *graph.Graph, vars []*context.Variable, grads []*graph.Node) {
	a.noteBackend(g.Backend())
	slot := map[*context.Variable]*context.Variable{}
	for _, t := range a.order {
		for k, p := range t.params() {
			slot[p] = t.grads[k]
		}
	}
	for i, v := range vars {
		if keep := slot[v]; keep != nil && grads[i] != nil {
			grad := grads[i]
			if grad.DType() != dtypes.Float32 {
				grad = graph.ConvertDType(grad, dtypes.Float32)
			}
			keep.SetValueGraph(grad)
		}
	}
}

// AfterStep implements peft.StepHook: Hugging Face's update_and_allocate for the step just
// taken (see the package comment).
func (a *AdaLoRA) AfterStep(ctx *context.Context, step int) error {
	if a.merge.Merged() {
		return peft.ErrMerged
	}
	n := len(a.order)
	final := a.cfg.TotalSteps - a.cfg.TFinal
	switch {
	case step < final:
		if err := a.updateScores(ctx); err != nil {
			return err
		}
		if budget, mask := a.cfg.Budget(n, step); mask {
			return a.allocate(ctx, step, budget, false)
		}
		return nil
	case step == final:
		budget, _ := a.cfg.Budget(n, step)
		return a.allocate(ctx, step, budget, true)
	default:
		return a.reapplyMask(ctx)
	}
}

// executors returns the allocator's compiled graphs, building them on first use.
func (a *AdaLoRA) executors(ctx *context.Context) (scoreExec, maskExec, reapply *context.Exec, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.scoreExec != nil && a.ctx == ctx {
		return a.scoreExec, a.maskExec, a.reapply, nil
	}
	if a.backend == nil {
		// No graph of the method ran yet (AfterStep called by hand): use the process backend.
		if a.backend, err = backend.Get(); err != nil {
			return nil, nil, nil, fmt.Errorf("adalora: %w", err)
		}
	}
	err = peft.Catch("adalora: building the allocator", func() error {
		var err error
		a.scoreExec, err = context.NewExec(a.backend, ctx, a.scoreGraph)
		if err != nil {
			return err
		}
		a.maskExec, err = context.NewExec(a.backend, ctx, a.maskGraph)
		if err != nil {
			return err
		}
		a.reapply, err = context.NewExec(a.backend, ctx, a.reapplyGraph)
		return err
	})
	if err != nil {
		a.scoreExec, a.maskExec, a.reapply = nil, nil, nil
		return nil, nil, nil, err
	}
	a.ctx = ctx
	return a.scoreExec, a.maskExec, a.reapply, nil
}

// scoreGraph updates Ī and Ū of every entry from the kept gradients and the current values, and
// returns the triplet scores of all targets concatenated [n·r].
func (a *AdaLoRA) scoreGraph(_ *context.Context, g *graph.Graph) *graph.Node {
	b1, b2 := a.cfg.Beta1, a.cfg.Beta2
	all := make([]*graph.Node, len(a.order))
	for i, t := range a.order {
		var s [3]*graph.Node
		for k, p := range t.params() {
			imp := graph.Abs(graph.Mul(p.ValueGraph(g), t.grads[k].ValueGraph(g)))
			ipt := graph.Add(graph.MulScalar(t.ipt[k].ValueGraph(g), b1), graph.MulScalar(imp, 1-b1))
			unc := graph.Add(graph.MulScalar(t.unc[k].ValueGraph(g), b2), graph.MulScalar(graph.Abs(graph.Sub(imp, ipt)), 1-b2))
			t.ipt[k].SetValueGraph(ipt)
			t.unc[k].SetValueGraph(unc)
			s[k] = graph.Mul(ipt, unc)
		}
		// S_i = s(Λ_i) + (mean over inputs of s(Q_i,:) + mean over outputs of s(P_:,i)).
		all[i] = graph.Add(s[1], graph.Add(graph.ReduceMean(s[0], 0), graph.ReduceMean(s[2], 1)))
	}
	if len(all) == 1 {
		return all[0]
	}
	return graph.Concatenate(all, 0)
}

// maskGraph writes the mask (inputs[0], [n·r]) into every target's mask variable and multiplies
// E by it; it returns the number of kept singular values.
func (a *AdaLoRA) maskGraph(_ *context.Context, inputs []*graph.Node) *graph.Node {
	mask := inputs[0]
	g := mask.Graph()
	r := a.cfg.InitRank
	for _, t := range a.order {
		m := graph.SliceAxis(mask, 0, graph.AxisRange(t.offset, t.offset+r))
		t.mask.SetValueGraph(m)
		t.e.SetValueGraph(graph.Mul(t.e.ValueGraph(g), m))
	}
	return graph.ReduceAllSum(mask)
}

// reapplyGraph multiplies every target's E by its mask variable; it returns the number of kept
// singular values.
func (a *AdaLoRA) reapplyGraph(_ *context.Context, g *graph.Graph) *graph.Node {
	kept := graph.Scalar(g, dtypes.Float32, 0)
	for _, t := range a.order {
		m := t.mask.ValueGraph(g)
		t.e.SetValueGraph(graph.Mul(t.e.ValueGraph(g), m))
		kept = graph.Add(kept, graph.ReduceAllSum(m))
	}
	return kept
}

// reapplyMask zeroes the masked Λ entries again, with the masks as they are (the frozen phase).
func (a *AdaLoRA) reapplyMask(ctx *context.Context) error {
	_, _, reapply, err := a.executors(ctx)
	if err != nil {
		return err
	}
	return peft.Catch("adalora: masking", func() error {
		_, err := reapply.Exec()
		return err
	})
}

// updateScores runs the importance update and keeps the new triplet scores.
func (a *AdaLoRA) updateScores(ctx *context.Context) error {
	scoreExec, _, _, err := a.executors(ctx)
	if err != nil {
		return err
	}
	var scores []float32
	err = peft.Catch("adalora: importance update", func() error {
		out, err := scoreExec.Exec()
		if err != nil {
			return err
		}
		scores = tensors.MustCopyFlatData[float32](out[0])
		return nil
	})
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.scores = scores
	a.mu.Unlock()
	return nil
}

// allocate keeps the budget highest-scoring singular values, writes the masks, zeroes the masked
// E entries and reports a changed pattern; final freezes the mask.
func (a *AdaLoRA) allocate(ctx *context.Context, step, budget int, final bool) error {
	a.mu.Lock()
	scores := a.scores
	a.mu.Unlock()
	if scores == nil { // no importance update yet (the budgeting phase has not started)
		scores = make([]float32, len(a.order)*a.cfg.InitRank)
	}
	keep := KeepTop(scores, budget)
	mask := make([]float32, len(keep))
	for i, k := range keep {
		if k {
			mask[i] = 1
		}
	}
	if err := a.applyMask(ctx, mask); err != nil {
		return err
	}
	pattern := a.patternOf(mask)
	a.mu.Lock()
	changed := !mapsEqual(pattern, a.pattern)
	a.pattern = pattern
	fn := a.onChange
	a.mu.Unlock()
	if (changed || final) && fn != nil {
		kept := 0
		for _, v := range pattern {
			kept += v
		}
		fn(RankEvent{Step: step, Budget: kept, Pattern: pattern, Final: final})
	}
	return nil
}

// applyMask runs the mask graph with the concatenated mask.
func (a *AdaLoRA) applyMask(ctx *context.Context, mask []float32) error {
	_, maskExec, _, err := a.executors(ctx)
	if err != nil {
		return err
	}
	return peft.Catch("adalora: masking", func() error {
		_, err := maskExec.Exec(tensors.FromFlatDataAndDimensions(slices.Clone(mask), len(mask)))
		return err
	})
}

// KeepTop returns which of scores to keep so that exactly min(budget, len(scores)) (and at least
// 0) are kept: the highest ones. Ties are broken by position, the later one kept; NaN counts as
// the lowest score. It is the allocator's selection, exported so that users can check an
// allocation against Scores.
func KeepTop(scores []float32, budget int) []bool {
	n := len(scores)
	budget = max(0, min(budget, n))
	idx := make([]int, n)
	for i := range idx {
		idx[i] = i
	}
	less := func(x, y float32) bool { // x < y, NaN lowest
		if math.IsNaN(float64(x)) {
			return !math.IsNaN(float64(y))
		}
		return !math.IsNaN(float64(y)) && x < y
	}
	sort.SliceStable(idx, func(i, j int) bool { return less(scores[idx[i]], scores[idx[j]]) })
	keep := make([]bool, n)
	for _, i := range idx[n-budget:] {
		keep[i] = true
	}
	return keep
}

// patternOf counts the kept singular values of each target in a concatenated mask.
func (a *AdaLoRA) patternOf(mask []float32) map[string]int {
	r := a.cfg.InitRank
	pattern := make(map[string]int, len(a.order))
	for _, t := range a.order {
		kept := 0
		for _, m := range mask[t.offset : t.offset+r] {
			if m != 0 {
				kept++
			}
		}
		pattern[t.layer.Path] = kept
	}
	return pattern
}

func mapsEqual(x, y map[string]int) bool {
	if len(x) != len(y) || x == nil || y == nil {
		return false
	}
	for k, v := range x {
		if w, ok := y[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// readMasks reads every target's mask, concatenated.
func (a *AdaLoRA) readMasks() ([]float32, error) {
	mask := make([]float32, 0, len(a.order)*a.cfg.InitRank)
	for _, t := range a.order {
		m, err := peft.Float32s(t.mask)
		if err != nil {
			return nil, fmt.Errorf("adalora: %w", err)
		}
		mask = append(mask, m...)
	}
	return mask, nil
}

// RankPattern returns the kept rank of every adapted layer, by path, as the masks hold it now:
// InitRank everywhere before the first allocation, and the rank pattern after training (also
// after Load: the masks are part of the saved state). It returns nil if a mask cannot be read.
func (a *AdaLoRA) RankPattern() map[string]int {
	mask, err := a.readMasks()
	if err != nil {
		return nil
	}
	return a.patternOf(mask)
}

// Scores returns the triplet scores S_i of every adapted layer (by path, one per singular value)
// from the last importance update, or nil before the first one.
func (a *AdaLoRA) Scores() map[string][]float32 {
	a.mu.Lock()
	scores := a.scores
	a.mu.Unlock()
	if scores == nil {
		return nil
	}
	r := a.cfg.InitRank
	out := make(map[string][]float32, len(a.order))
	for _, t := range a.order {
		out[t.layer.Path] = slices.Clone(scores[t.offset : t.offset+r])
	}
	return out
}

// EffectiveParams counts the adapter parameters that the rank pattern keeps: kept rank·(in + out
// + 1) summed over the adapted layers (the modules to save not included). It equals the
// trainable adapter parameters, InitRank·(in + out + 1) per layer, before the first allocation.
func (a *AdaLoRA) EffectiveParams() int64 {
	pattern := a.RankPattern()
	var total int64
	for _, t := range a.order {
		total += int64(pattern[t.layer.Path] * (t.layer.In + t.layer.Out + 1))
	}
	return total
}

// Merge implements peft.Merger: W ← W + s·A·diag(E)·B (= s·(P·diag(Λ)·Q)ᵀ; masked Λ entries are
// zero) for every target. The base weights are kept aside so that Unmerge restores them bit for
// bit.
func (a *AdaLoRA) Merge(ctx *context.Context) error {
	layers := make([]*peft.LinearLayer, len(a.order))
	for i, t := range a.order {
		layers[i] = t.layer
	}
	if err := a.merge.Merge(ctx, layers, func(i int) ([]float32, error) { return a.delta(a.order[i]) }); err != nil {
		return fmt.Errorf("adalora: %w", err)
	}
	return nil
}

// delta returns s·A·diag(E)·B, [in, out] row-major.
func (a *AdaLoRA) delta(t *target) ([]float32, error) {
	av, err := peft.Float32s(t.a)
	if err != nil {
		return nil, err
	}
	ev, err := peft.Float32s(t.e)
	if err != nil {
		return nil, err
	}
	bv, err := peft.Float32s(t.b)
	if err != nil {
		return nil, err
	}
	return peft.LowRankProduct(av, t.layer.In, a.cfg.InitRank, ev, bv, t.layer.Out, a.scale), nil
}

// Unmerge implements peft.Merger: it restores the base weights exactly as they were.
func (a *AdaLoRA) Unmerge(ctx *context.Context) error {
	if err := a.merge.Unmerge(ctx); err != nil {
		return fmt.Errorf("adalora: %w", err)
	}
	return nil
}

// Merged implements peft.Merger.
func (a *AdaLoRA) Merged() bool { return a.merge.Merged() }

// Delta returns the update s·A·diag(E)·B ([in, out], row-major) of the layer at path: what Merge
// adds to its weights.
func (a *AdaLoRA) Delta(path string) ([]float32, error) {
	t := a.targets[path]
	if t == nil {
		return nil, fmt.Errorf("adalora: layer %q is not adapted (adapted: %v)", path, a.Targets())
	}
	return a.delta(t)
}
