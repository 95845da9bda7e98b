package peft_test

import (
	"errors"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/llama"
	"peft/peft/pefttest"
)

func newTrainer(t *testing.T, m *peft.Model, steps int) *peft.Trainer {
	t.Helper()
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: steps, LearningRate: 1e-2, Loss: peft.CrossEntropy,
		Accuracy: true, Progress: peft.ProgressOff})
	require.NoError(t, err)
	return trainer
}

// Evaluate sees the model as it is: merged, unmerged, and in either order of first use.
func TestEvaluateFollowsMergeAndUnmerge(t *testing.T) {
	m := pefttest.NewModel(t, newLoRA(t))
	trainer := newTrainer(t, m, 5)
	_, err := trainer.Train(peft.NewDataset("train", pefttest.ToyBatches(5, 3), true))
	require.NoError(t, err)
	eval := peft.NewDataset("eval", pefttest.ToyBatches(2, 7), false)
	unmerged, err := trainer.Evaluate(eval)
	require.NoError(t, err)

	require.NoError(t, m.Merge())
	merged, err := trainer.Evaluate(eval)
	require.NoError(t, err)
	require.InDelta(t, unmerged.Loss, merged.Loss, 1e-5)
	_, err = trainer.Train(peft.NewDataset("train", pefttest.ToyBatches(1, 3), true))
	require.ErrorIs(t, err, peft.ErrMerged)
	require.NoError(t, m.Unmerge())
	again, err := trainer.Evaluate(eval)
	require.NoError(t, err)
	require.Equal(t, unmerged, again)

	// A trainer whose first graph is built while merged.
	m2 := pefttest.NewModel(t, newLoRA(t))
	require.NoError(t, m2.Merge())
	first := newTrainer(t, m2, 5)
	whileMerged, err := first.Evaluate(eval)
	require.NoError(t, err)
	require.NoError(t, m2.Unmerge())
	after, err := first.Evaluate(eval)
	require.NoError(t, err)
	require.InDelta(t, whileMerged.Loss, after.Loss, 1e-5)

	_, err = first.Evaluate(peft.NewDataset("looping", pefttest.ToyBatches(1, 7), true))
	require.ErrorContains(t, err, "loops forever")
}

// A second trainer continues the step count; asking it for steps already taken is an error.
func TestSecondTrainerContinues(t *testing.T) {
	m := pefttest.NewModel(t, newLoRA(t))
	ds := peft.NewDataset("train", pefttest.ToyBatches(4, 3), true)
	_, err := newTrainer(t, m, 4).Train(ds)
	require.NoError(t, err)
	_, err = newTrainer(t, m, 4).Train(ds)
	require.ErrorContains(t, err, "already at step 4 of Steps 4")
	losses, err := newTrainer(t, m, 6).Train(ds)
	require.NoError(t, err)
	require.Len(t, losses, 2, "steps 5 and 6")
}

// Tracing a model whose context already holds optimizer state and another method's weights
// finds only the model's own variables.
func TestNewModelOnTrainedContext(t *testing.T) {
	m := pefttest.NewModel(t, newLoRA(t))
	_, err := newTrainer(t, m, 2).Train(peft.NewDataset("train", pefttest.ToyBatches(2, 3), true))
	require.NoError(t, err)
	base := pefttest.NewModel(t, nil)
	again, err := peft.NewModel(m.Backend(), m.Context(), llama.Classifier(pefttest.Config(), 2), nil, shapes.Make(dtypes.Int32, 2, 4))
	require.NoError(t, err)
	require.Len(t, again.Layout().BaseVariables, len(base.Layout().BaseVariables))
	require.Equal(t, base.Report().All, again.Report().All)
}

// stepCounter is LoRA plus a StepHook that counts calls and fails at a chosen step.
type stepCounter struct {
	*lora.LoRA
	calls  []int
	failAt int
}

func (s *stepCounter) AfterStep(_ *context.Context, step int) error {
	s.calls = append(s.calls, step)
	if step == s.failAt {
		return errors.New("rank reallocation failed")
	}
	return nil
}

func TestStepHookRunsAfterEveryStep(t *testing.T) {
	method := &stepCounter{LoRA: newLoRA(t).(*lora.LoRA), failAt: 4}
	m := pefttest.NewModel(t, method)
	_, err := newTrainer(t, m, 6).Train(peft.NewDataset("train", pefttest.ToyBatches(6, 3), true))
	require.ErrorContains(t, err, "step 4: lora: rank reallocation failed")
	require.Equal(t, []int{1, 2, 3, 4}, method.calls)
}

// infiniteGradient is LoRA plus a loss term whose value is 0 but whose gradient is not finite.
type infiniteGradient struct{ *lora.LoRA }

func (i infiniteGradient) Loss(ctx *context.Context, g *graph.Graph) *graph.Node {
	v := i.Trainable(ctx)[0].Variable.ValueGraph(g)
	return graph.ReduceAllSum(graph.Sqrt(graph.Abs(graph.Sub(v, graph.StopGradient(v)))))
}

func TestTrainingStopsOnNonFiniteGradient(t *testing.T) {
	method := infiniteGradient{newLoRA(t).(*lora.LoRA)}
	m := pefttest.NewModel(t, method)
	before := trainableValues(t, m)
	_, err := newTrainer(t, m, 3).Train(peft.NewDataset("train", pefttest.ToyBatches(3, 3), true))
	require.ErrorContains(t, err, "training stopped at step 1: the gradient norm is not finite")
	require.Equal(t, before, trainableValues(t, m), "the step must not be applied")
}

// zeroRate trains LoRA's variables with a learning-rate multiplier of 0, which would freeze them
// silently.
type zeroRate struct{ *lora.LoRA }

func (z zeroRate) Trainable(ctx *context.Context) []peft.TrainableVariable {
	tvs := z.LoRA.Trainable(ctx)
	tvs[0].LRScale = 0
	return tvs
}

func TestZeroLearningRateMultiplierIsAnError(t *testing.T) {
	m := pefttest.NewModel(t, zeroRate{newLoRA(t).(*lora.LoRA)})
	_, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 1, Loss: peft.CrossEntropy})
	require.ErrorContains(t, err, "learning-rate multiplier of 0")
	_, err = peft.NewTrainer(nil, peft.TrainConfig{Steps: 1, Loss: peft.CrossEntropy})
	require.ErrorContains(t, err, "nil model")
}

// The progress bar survives a run cut into several calls (examples/train trains between
// validations): each call gets its own bar.
func TestProgressBarAcrossCalls(t *testing.T) {
	m := pefttest.NewModel(t, newLoRA(t))
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 6, LearningRate: 1e-2, Loss: peft.CrossEntropy, Progress: peft.ProgressBar})
	require.NoError(t, err)
	ds := peft.NewDataset("train", pefttest.ToyBatches(3, 3), true)
	for range 3 {
		_, err := trainer.TrainSteps(ds, 2)
		require.NoError(t, err)
	}
	require.Equal(t, 6, trainer.Step())
}
