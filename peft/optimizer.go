package peft

import (
	"fmt"
	"math"

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

	// Variables returns the variables to train; called when the train graph is built.
	Variables func() []TrainableVariable
	// Gradients, if not nil, sees the gradients of the variables in the train graph.
	Gradients GradientHook
}

// optimizerScope holds the optimizer's moments, apart from the model's variables.
const optimizerScope = "peft_adamw"

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
	if o.Gradients != nil {
		o.Gradients.ObserveGradients(ctx, g, vars, grads)
	}

	f32 := func(x *graph.Node) *graph.Node {
		if x.DType() == dtypes.Float32 {
			return x
		}
		return graph.ConvertDType(x, dtypes.Float32)
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
	finite := graph.LogicalAnd(graph.IsFinite(f32(loss)), graph.IsFinite(norm))
	skippedVar := ctx.InAbsPath(context.ScopeSeparator+optimizerScope).Checked(false).
		VariableWithValue(skippedStepsName, int64(0)).SetTrainable(false)
	skipped := skippedVar.ValueGraph(g)
	skippedVar.SetValueGraph(graph.Where(finite, skipped, graph.OnePlus(skipped)))

	step := optimizers.IncrementGlobalStepGraph(ctx, g, dtypes.Float32)
	lr := graph.MulScalar(o.Schedule.FactorGraph(step), o.LearningRate)
	debias1 := graph.Reciprocal(graph.OneMinus(graph.Pow(graph.Scalar(g, dtypes.Float32, o.Beta1), step)))
	debias2 := graph.Reciprocal(graph.OneMinus(graph.Pow(graph.Scalar(g, dtypes.Float32, o.Beta2), step)))

	momentsRoot := context.ScopeSeparator + optimizerScope
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
		newValue := graph.Sub(oldF, graph.Mul(graph.MulScalar(lr, tvs[i].LRScale), update))
		if newValue.DType() != old.DType() {
			newValue = graph.ConvertDType(newValue, old.DType())
		}
		v.SetValueGraph(graph.Where(finite, newValue, old))
		m1Var.SetValueGraph(graph.Where(finite, m1, m1Old))
		m2Var.SetValueGraph(graph.Where(finite, m2, m2Old))
	}
}

// Clear deletes the optimizer's moments. It implements optimizers.Interface.
func (o *AdamW) Clear(ctx *context.Context) error {
	return ctx.InAbsPath(context.ScopeSeparator + optimizerScope).DeleteVariablesInScope()
}

// OptimizerStateBytes returns the bytes of optimizer state held in ctx (the moments).
func OptimizerStateBytes(ctx *context.Context) int64 {
	var total int64
	for v := range ctx.InAbsPath(context.ScopeSeparator + optimizerScope).IterVariablesInScope() {
		if v.Name() != skippedStepsName {
			total += int64(v.Shape().Memory())
		}
	}
	return total
}
