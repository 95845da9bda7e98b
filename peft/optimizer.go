package peft

import (
	"fmt"
	"math"
	"strings"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gomlx/pkg/ml/train/optimizers"
	"github.com/gomlx/gopjrt/dtypes"
)

// Decay is the shape of the learning-rate decay after warmup.
type Decay string

const (
	// ConstantDecay keeps the peak learning rate after warmup.
	ConstantDecay Decay = "constant"
	// LinearDecay goes linearly from the peak to Schedule.MinRatio·peak at the last step.
	LinearDecay Decay = "linear"
	// CosineDecay follows half a cosine from the peak to Schedule.MinRatio·peak at the last step.
	CosineDecay Decay = "cosine"
)

// Schedule is a learning-rate schedule: linear warmup from 0 to the peak over WarmupSteps, then
// Decay down to MinRatio·peak at TotalSteps.
type Schedule struct {
	WarmupSteps int
	TotalSteps  int
	Decay       Decay
	MinRatio    float64
}

// Validate checks the schedule.
func (s Schedule) Validate() error {
	switch s.Decay {
	case ConstantDecay, LinearDecay, CosineDecay:
	default:
		return fmt.Errorf("unknown learning-rate decay %q (want %q, %q or %q)", s.Decay, ConstantDecay, LinearDecay, CosineDecay)
	}
	if s.WarmupSteps < 0 || s.TotalSteps < 0 {
		return fmt.Errorf("warmup steps (%d) and total steps (%d) must be ≥ 0", s.WarmupSteps, s.TotalSteps)
	}
	if s.Decay != ConstantDecay && s.TotalSteps <= s.WarmupSteps {
		return fmt.Errorf("%s decay needs total steps (%d) > warmup steps (%d)", s.Decay, s.TotalSteps, s.WarmupSteps)
	}
	if s.MinRatio < 0 || s.MinRatio > 1 {
		return fmt.Errorf("minimum learning-rate ratio %g must be in [0, 1]", s.MinRatio)
	}
	return nil
}

// FactorGraph returns the multiplier of the peak learning rate at step (counted from 1), as a
// float32 scalar node.
func (s Schedule) FactorGraph(step *graph.Node) *graph.Node {
	g := step.Graph()
	t := graph.ConvertDType(step, dtypes.Float32)
	one := graph.Scalar(g, dtypes.Float32, 1.0)
	factor := one
	if s.Decay != ConstantDecay {
		span := float64(s.TotalSteps - s.WarmupSteps)
		progress := graph.DivScalar(graph.AddScalar(t, -float64(s.WarmupSteps)), span)
		progress = graph.ClipScalar(progress, 0, 1)
		var shape *graph.Node
		if s.Decay == LinearDecay {
			shape = graph.OneMinus(progress)
		} else {
			shape = graph.MulScalar(graph.OnePlus(graph.Cos(graph.MulScalar(progress, math.Pi))), 0.5)
		}
		factor = graph.AddScalar(graph.MulScalar(shape, 1-s.MinRatio), s.MinRatio)
	}
	if s.WarmupSteps > 0 {
		warm := graph.ClipScalar(graph.DivScalar(t, float64(s.WarmupSteps)), 0, 1)
		factor = graph.Where(graph.LessOrEqual(t, graph.Scalar(g, dtypes.Float32, float64(s.WarmupSteps))), warm, factor)
	}
	return factor
}

// AdamW is the optimizer our trainer uses: Adam with decoupled weight decay, a per-variable
// learning-rate multiplier (layer-wise decay), global-norm gradient clipping and a Schedule. It
// implements GoMLX's optimizers.Interface, and updates exactly the variables it is given, so the
// trainer's own variables are never swept in.
//
// A step whose loss or gradient norm is not finite changes nothing and is counted (the trainer
// then stops with an error that names the step).
type AdamW struct {
	LearningRate float64
	Beta1, Beta2 float64
	Epsilon      float64
	WeightDecay  float64
	// ClipNorm clips the global gradient norm to this value; 0 disables clipping.
	ClipNorm float64
	Schedule Schedule
	// DivergenceFactor skips (and the trainer then stops at) a step whose loss is over this many
	// times its running average (or 1, whichever is larger), once the average has seen a few
	// steps; 0 disables the check.
	DivergenceFactor float64
	// MaxUpdateRatio skips a step whose update's norm is over this many times the norm of the
	// weights it updates (at least 0.01 per value): a learning rate far too high; 0 disables the
	// check.
	MaxUpdateRatio float64
	// Accumulate is the number of micro-batches whose gradients make one step (0 or 1: every
	// batch is a step). Each micro-batch is weighted by its loss weight (NextTokenLoss's scored
	// pairs; 1 for other losses), so the step is the one a batch of them all would make; the
	// global step, the schedule and the moments advance once per step.
	Accumulate int

	// Variables returns the variables to train; called when the train graph is built.
	Variables func() []TrainableVariable
	// Gradients, if not nil, sees the gradients of the variables in the train graph.
	Gradients GradientHook
}

// optimizerScope holds the optimizer's moments, apart from the model's variables.
const optimizerScope = "peft_adamw"

// accumulateScope holds the gradient sums of a step being accumulated (AdamW.Accumulate).
const accumulateScope = "peft_adamw_accumulate"

// skippedStepsName is the optimizer's int64 count of steps it skipped because the loss or the
// gradient norm was not finite; the trainer stops when it grows.
const skippedStepsName = "skipped_steps"

// UpdateGraph builds the training update for loss. It implements optimizers.Interface.
func (o *AdamW) UpdateGraph(ctx *context.Context, g *graph.Graph, loss *graph.Node) {
	tvs := o.Variables()
	if len(tvs) == 0 {
		panic("peft: the method has no trainable variables")
	}
	vars := make([]*context.Variable, len(tvs))
	values := make([]*graph.Node, len(tvs))
	for i, tv := range tvs {
		vars[i] = tv.Variable
		values[i] = tv.Variable.ValueGraph(g)
	}
	grads := graph.Gradient(loss, values...)
	apply, lossFinite, stepLoss := graph.Const(g, true), graph.IsFinite(f32(loss)), f32(loss)
	if o.Accumulate > 1 {
		grads, apply, lossFinite, stepLoss = o.accumulate(ctx, g, loss, vars, grads)
	}
	if o.Gradients != nil {
		o.Gradients.ObserveGradients(ctx, g, vars, grads)
	}

	sumSquares := graph.Scalar(g, dtypes.Float32, 0)
	for _, grad := range grads {
		sumSquares = graph.Add(sumSquares, graph.ReduceAllSum(graph.Square(f32(grad))))
	}
	norm := graph.Sqrt(sumSquares)
	clipScale := graph.Scalar(g, dtypes.Float32, 1)
	if o.ClipNorm > 0 {
		clipScale = graph.Min(clipScale, graph.Div(graph.Scalar(g, dtypes.Float32, o.ClipNorm), graph.AddScalar(norm, 1e-6)))
	}

	step := optimizers.IncrementGlobalStepGraph(ctx, g, dtypes.Float32)
	if o.Accumulate > 1 {
		stepVar := optimizers.GetGlobalStepVar(ctx)
		// Undo the increment on the micro-batches that do not end a step.
		kept := graph.Sub(stepVar.ValueGraph(g), graph.ConvertDType(graph.LogicalNot(apply), dtypes.Int64))
		stepVar.SetValueGraph(kept)
		step = graph.ConvertDType(kept, dtypes.Float32)
	}
	lr := graph.MulScalar(o.Schedule.FactorGraph(step), o.LearningRate)
	debias1 := graph.Reciprocal(graph.OneMinus(graph.Pow(graph.Scalar(g, dtypes.Float32, o.Beta1), step)))
	debias2 := graph.Reciprocal(graph.OneMinus(graph.Pow(graph.Scalar(g, dtypes.Float32, o.Beta2), step)))

	// The new values and moments, set below only if the step passes the checks.
	momentsRoot := context.ScopeSeparator + optimizerScope
	type pending struct {
		v, m1Var, m2Var                     *context.Variable
		newValue, old, m1, m2, m1Old, m2Old *graph.Node
	}
	updates := make([]pending, len(vars))
	newFinite := graph.Const(g, true)
	deltaSquares, weightSquares := graph.Scalar(g, dtypes.Float32, 0), graph.Scalar(g, dtypes.Float32, 0)
	for i, v := range vars {
		grad := graph.Mul(f32(grads[i]), clipScale)
		shape := shapes.Make(dtypes.Float32, v.Shape().Dimensions...)
		scoped := ctx.InAbsPath(momentsRoot + v.Scope()).Checked(false)
		m1Var := scoped.VariableWithValue(v.Name()+"_m1", zerosTensor(shape)).SetTrainable(false)
		m2Var := scoped.VariableWithValue(v.Name()+"_m2", zerosTensor(shape)).SetTrainable(false)
		m1Old, m2Old := m1Var.ValueGraph(g), m2Var.ValueGraph(g)
		m1 := graph.Add(graph.MulScalar(m1Old, o.Beta1), graph.MulScalar(grad, 1-o.Beta1))
		m2 := graph.Add(graph.MulScalar(m2Old, o.Beta2), graph.MulScalar(graph.Square(grad), 1-o.Beta2))
		update := graph.Div(graph.Mul(m1, debias1), graph.AddScalar(graph.Sqrt(graph.Mul(m2, debias2)), o.Epsilon))
		old := values[i]
		oldF := f32(old)
		if o.WeightDecay > 0 {
			update = graph.Add(update, graph.MulScalar(oldF, o.WeightDecay))
		}
		newF := graph.Sub(oldF, graph.Mul(graph.MulScalar(lr, tvs[i].LRScale), update))
		newFinite = graph.LogicalAnd(newFinite, graph.ReduceLogicalAnd(graph.IsFinite(newF)))
		deltaSquares = graph.Add(deltaSquares, graph.ReduceAllSum(graph.Square(graph.Sub(newF, oldF))))
		weightSquares = graph.Add(weightSquares, graph.ReduceAllSum(graph.Square(oldF)))
		newValue := newF
		if newValue.DType() != old.DType() {
			newValue = graph.ConvertDType(newValue, old.DType())
		}
		updates[i] = pending{v: v, m1Var: m1Var, m2Var: m2Var, newValue: newValue, old: old, m1: m1, m2: m2, m1Old: m1Old, m2Old: m2Old}
	}

	// The checks, in the order the trainer reports them: a non-finite loss or gradient, a loss
	// grown by DivergenceFactor over its running average, an update larger than MaxUpdateRatio
	// times the weights, non-finite new values.
	state := ctx.InAbsPath(context.ScopeSeparator + optimizerScope).Checked(false)
	scalarVar := func(name string, v any) *context.Variable {
		return state.VariableWithValue(name, v).SetTrainable(false)
	}
	emaVar, emaCountVar := scalarVar("loss_average", float32(0)), scalarVar("loss_average_steps", int64(0))
	ema, emaCount := emaVar.ValueGraph(g), emaCountVar.ValueGraph(g)
	// The weights' norm has a floor of 0.01 per value, so that weights starting at zero (a new
	// bias, LoRA's B) take ordinary steps.
	floor := 0.01 * math.Sqrt(float64(numValues(vars)))
	ratio := graph.Div(graph.Sqrt(deltaSquares), graph.Max(graph.Sqrt(weightSquares), graph.Scalar(g, dtypes.Float32, floor)))
	falseNode := graph.Const(g, false)
	grown, tooLarge := falseNode, falseNode
	if o.DivergenceFactor > 0 {
		// Judged against an average of at least 1: a loss trained down to 1e-5 on repeated data
		// may rise to an ordinary 1 on a fresh batch without diverging.
		grown = graph.LogicalAnd(graph.GreaterOrEqual(emaCount, graph.Scalar(g, dtypes.Int64, divergenceWarmup)),
			graph.GreaterThan(stepLoss, graph.MulScalar(graph.Max(ema, graph.Scalar(g, dtypes.Float32, 1)), o.DivergenceFactor)))
	}
	if o.MaxUpdateRatio > 0 {
		tooLarge = graph.GreaterThan(ratio, graph.Scalar(g, dtypes.Float32, o.MaxUpdateRatio))
	}
	finite := graph.LogicalAnd(lossFinite, graph.IsFinite(norm))
	reason := graph.Scalar(g, dtypes.Int64, int64(SkipNone))
	for _, c := range []struct {
		bad  *graph.Node
		code SkipReason
	}{{graph.LogicalNot(newFinite), SkipNonFiniteUpdate}, {tooLarge, SkipLargeUpdate}, {grown, SkipLossGrew},
		{graph.LogicalNot(graph.IsFinite(norm)), SkipNonFiniteGradient}, {graph.LogicalNot(lossFinite), SkipNonFiniteLoss}} {
		reason = graph.Where(c.bad, graph.Scalar(g, dtypes.Int64, int64(c.code)), reason) // the last listed wins
	}
	ok := graph.LogicalAnd(finite, graph.Equal(reason, graph.Scalar(g, dtypes.Int64, int64(SkipNone))))
	skip := graph.LogicalAnd(apply, graph.LogicalNot(ok))
	skippedVar := scalarVar(skippedStepsName, int64(0))
	skipped := skippedVar.ValueGraph(g)
	skippedVar.SetValueGraph(graph.Where(skip, graph.OnePlus(skipped), skipped))
	for _, r := range []struct {
		name  string
		value *graph.Node
	}{{"skip_reason", reason}, {"skip_loss", stepLoss}, {"skip_loss_average", ema}, {"skip_update_ratio", ratio}} {
		v := scalarVar(r.name, shapes.CastAsDType(0, r.value.DType()))
		v.SetValueGraph(graph.Where(skip, r.value, v.ValueGraph(g)))
	}
	applied := graph.LogicalAnd(apply, ok) // the variables change only on a good step's last micro-batch
	first := graph.Equal(emaCount, graph.ZerosLike(emaCount))
	newEMA := graph.Where(first, stepLoss, graph.Add(graph.MulScalar(ema, 0.9), graph.MulScalar(stepLoss, 0.1)))
	emaVar.SetValueGraph(graph.Where(applied, newEMA, ema))
	emaCountVar.SetValueGraph(graph.Where(applied, graph.OnePlus(emaCount), emaCount))
	for _, u := range updates {
		u.v.SetValueGraph(graph.Where(applied, u.newValue, u.old))
		u.m1Var.SetValueGraph(graph.Where(applied, u.m1, u.m1Old))
		u.m2Var.SetValueGraph(graph.Where(applied, u.m2, u.m2Old))
	}
}

// numValues is the number of values of vars.
func numValues(vars []*context.Variable) int {
	n := 0
	for _, v := range vars {
		n += v.Shape().Size()
	}
	return n
}

// divergenceWarmup is the number of good steps the loss average needs before a loss is judged
// against it.
const divergenceWarmup = 3

// SkipReason says why the optimizer skipped a step (it then changes nothing, and the trainer
// stops with an error saying so).
type SkipReason int64

const (
	SkipNone SkipReason = iota
	// SkipNonFiniteLoss: the loss is NaN or infinite.
	SkipNonFiniteLoss
	// SkipNonFiniteGradient: the gradient norm is NaN or infinite.
	SkipNonFiniteGradient
	// SkipLossGrew: the loss is over DivergenceFactor times its running average.
	SkipLossGrew
	// SkipLargeUpdate: the update's norm is over MaxUpdateRatio times the weights' norm.
	SkipLargeUpdate
	// SkipNonFiniteUpdate: the updated weights would not be finite.
	SkipNonFiniteUpdate
)

// accumulate adds this micro-batch's gradients, weighted by its loss weight, to the running sums
// and returns their weighted mean, whether this micro-batch ends the step, and whether every
// loss of the step so far was finite. The sums restart after the step's last micro-batch.
func (o *AdamW) accumulate(ctx *context.Context, g *graph.Graph, loss *graph.Node, vars []*context.Variable, grads []*graph.Node) (mean []*graph.Node, apply, lossFinite, stepLoss *graph.Node) {
	scope := ctx.InAbsPath(context.ScopeSeparator + accumulateScope).Checked(false)
	microVar := scope.VariableWithValue("micro_batches", int64(0)).SetTrainable(false)
	weightVar := scope.VariableWithValue("weight", float32(0)).SetTrainable(false)
	lossVar := scope.VariableWithValue("weighted_loss", float32(0)).SetTrainable(false)
	badVar := scope.VariableWithValue("non_finite_losses", int64(0)).SetTrainable(false)
	w := takeLossWeight(g)
	if w == nil {
		w = graph.Scalar(g, dtypes.Float32, 1)
	}
	w = f32(w)
	micro := graph.OnePlus(microVar.ValueGraph(g))
	apply = graph.Equal(micro, graph.Scalar(g, dtypes.Int64, o.Accumulate))
	bad := graph.Add(badVar.ValueGraph(g), graph.ConvertDType(graph.LogicalNot(graph.IsFinite(f32(loss))), dtypes.Int64))
	weight := graph.Add(weightVar.ValueGraph(g), w)
	denominator := graph.Max(weight, graph.Scalar(g, dtypes.Float32, 1e-30))
	lossSum := graph.Add(lossVar.ValueGraph(g), graph.Mul(f32(loss), w))
	stepLoss = graph.Div(lossSum, denominator)
	lossVar.SetValueGraph(graph.Where(apply, graph.ZerosLike(lossSum), lossSum))
	for i, v := range vars {
		shape := shapes.Make(dtypes.Float32, v.Shape().Dimensions...)
		sumVar := ctx.InAbsPath(context.ScopeSeparator+accumulateScope+v.Scope()).Checked(false).
			VariableWithValue(v.Name()+"_grad", zerosTensor(shape)).SetTrainable(false)
		sum := graph.Add(sumVar.ValueGraph(g), graph.Mul(f32(grads[i]), w))
		mean = append(mean, graph.Div(sum, denominator))
		sumVar.SetValueGraph(graph.Where(apply, graph.ZerosLike(sum), sum))
	}
	microVar.SetValueGraph(graph.Where(apply, graph.ZerosLike(micro), micro))
	weightVar.SetValueGraph(graph.Where(apply, graph.ZerosLike(weight), weight))
	badVar.SetValueGraph(graph.Where(apply, graph.ZerosLike(bad), bad))
	return mean, apply, graph.Equal(bad, graph.ZerosLike(bad)), stepLoss
}

// f32 converts x to float32.
func f32(x *graph.Node) *graph.Node {
	if x.DType() == dtypes.Float32 {
		return x
	}
	return graph.ConvertDType(x, dtypes.Float32)
}

// Clear deletes the optimizer's moments. It implements optimizers.Interface.
func (o *AdamW) Clear(ctx *context.Context) error {
	if err := ctx.InAbsPath(context.ScopeSeparator + accumulateScope).DeleteVariablesInScope(); err != nil {
		return err
	}
	return ctx.InAbsPath(context.ScopeSeparator + optimizerScope).DeleteVariablesInScope()
}

// OptimizerStateBytes returns the bytes of optimizer state held in ctx (the moments).
func OptimizerStateBytes(ctx *context.Context) int64 {
	var total int64
	for v := range ctx.InAbsPath(context.ScopeSeparator + optimizerScope).IterVariablesInScope() {
		if strings.HasSuffix(v.Name(), "_m1") || strings.HasSuffix(v.Name(), "_m2") {
			total += int64(v.Shape().Memory())
		}
	}
	return total
}
