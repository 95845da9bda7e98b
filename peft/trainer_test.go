package peft_test

import (
	"bytes"
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/graph"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/pefttest"
)

func TestTrainConfigErrors(t *testing.T) {
	m := pefttest.NewModel(t, newHead("score"))
	ok := peft.TrainConfig{Steps: 10, Loss: peft.CrossEntropy, Progress: peft.ProgressOff}
	for _, tc := range []struct {
		name   string
		mutate func(*peft.TrainConfig)
		want   string
	}{
		{"zero steps", func(c *peft.TrainConfig) { c.Steps = 0 }, "Steps must be > 0, got 0"},
		{"negative steps", func(c *peft.TrainConfig) { c.Steps = -3 }, "Steps must be > 0, got -3"},
		{"no loss", func(c *peft.TrainConfig) { c.Loss = nil }, "Loss is required"},
		{"negative learning rate", func(c *peft.TrainConfig) { c.LearningRate = -1e-3 }, "LearningRate must be > 0, got -0.001"},
		{"NaN learning rate", func(c *peft.TrainConfig) { c.LearningRate = math.NaN() }, "LearningRate must be > 0, got NaN"},
		{"unknown decay", func(c *peft.TrainConfig) { c.Decay = "step" }, `unknown learning-rate decay "step"`},
		{"warmup as long as training", func(c *peft.TrainConfig) { c.WarmupSteps = 10 }, "linear decay needs total steps (10) > warmup steps (10)"},
		{"negative warmup", func(c *peft.TrainConfig) { c.WarmupSteps = -1 }, "warmup steps (-1)"},
		{"min ratio", func(c *peft.TrainConfig) { c.MinLRRatio = 2 }, "minimum learning-rate ratio 2 must be in [0, 1]"},
		{"beta1 = 1", func(c *peft.TrainConfig) { c.Beta1 = 1 }, "Adam betas must be in [0, 1), got 1, 0.999"},
		{"negative beta2", func(c *peft.TrainConfig) { c.Beta2 = -0.5 }, "Adam betas must be in [0, 1), got 0.9, -0.5"},
		{"negative weight decay", func(c *peft.TrainConfig) { c.WeightDecay = -0.1 }, "WeightDecay must be ≥ 0, got -0.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := ok
			tc.mutate(&cfg)
			trainer, err := peft.NewTrainer(m, cfg)
			require.Nil(t, trainer)
			require.ErrorContains(t, err, "peft.TrainConfig: ")
			require.ErrorContains(t, err, tc.want)
		})
	}
	// Warmup as long as training is fine with a constant rate.
	_, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 10, WarmupSteps: 10, Decay: peft.ConstantDecay, Loss: peft.CrossEntropy})
	require.NoError(t, err)

	_, err = peft.NewTrainer(pefttest.NewModel(t, nil), ok)
	require.ErrorContains(t, err, "the model has no method: nothing to train")
	_, err = peft.NewTrainer(pefttest.NewModel(t, &headMethod{}), ok)
	require.ErrorContains(t, err, "method head has no trainable variables")
}

// nanBatches are toy batches with a second label, a float32 [Batch, 1] factor the loss is
// multiplied by: 1, except NaN in batch nanAt (0-based; -1 for none).
func nanBatches(n, nanAt int) []peft.Batch { return scaledBatches(n, nanAt, float32(math.NaN())) }

// scaledBatches are toy batches whose loss scaledLoss multiplies by 1, and by scale at batch at.
func scaledBatches(n, at int, scale float32) []peft.Batch {
	batches := pefttest.ToyBatches(n, 3)
	for i := range batches {
		factor := make([]float32, pefttest.Batch)
		for j := range factor {
			factor[j] = 1
			if i == at {
				factor[j] = scale
			}
		}
		batches[i].Labels = append(batches[i].Labels, tensors.FromFlatDataAndDimensions(factor, pefttest.Batch, 1))
	}
	return batches
}

func scaledLoss(labels, predictions []*graph.Node) *graph.Node {
	return graph.Mul(peft.CrossEntropy(labels[:1], predictions), graph.ReduceAllMean(labels[1]))
}

func newLoRA(t *testing.T) peft.Method {
	t.Helper()
	cfg := lora.DefaultConfig()
	cfg.ModulesToSave = []string{"score"}
	l, err := lora.New(cfg)
	require.NoError(t, err)
	return l
}

func trainableValues(t *testing.T, m *peft.Model) map[string][]float32 {
	t.Helper()
	values := map[string][]float32{}
	for _, tv := range m.TrainableVariables() {
		v, err := peft.Float32s(tv.Variable)
		require.NoError(t, err)
		values[tv.Variable.ScopeAndName()] = v
	}
	return values
}

// A loss that jumps by orders of magnitude over its running average stops the run before the
// step is applied: the weights are those of the steps before. With the check off it trains on.
func TestTrainingStopsWhenTheLossExplodes(t *testing.T) {
	cfg := peft.TrainConfig{Steps: 6, LearningRate: 1e-2, Decay: peft.ConstantDecay, Loss: scaledLoss, Progress: peft.ProgressOff}
	m := pefttest.NewModel(t, newLoRA(t))
	trainer, err := peft.NewTrainer(m, cfg)
	require.NoError(t, err)
	losses, err := trainer.Train(peft.NewDataset("train", scaledBatches(6, 4, 1e4), true))
	require.Error(t, err)
	require.Regexp(t, `training stopped at step 5: the loss [0-9.e+]+ is [0-9]+× its running average [0-9.]+, so the run is diverging; `+
		`the step was not applied and the weights are those after step 4: lower the learning rate \(it is 0.01\)`, err.Error())
	require.Len(t, losses, 4)

	ref := pefttest.NewModel(t, newLoRA(t))
	refTrainer, err := peft.NewTrainer(ref, cfg)
	require.NoError(t, err)
	_, err = refTrainer.Train(peft.NewDataset("train", scaledBatches(4, -1, 1), false))
	require.ErrorContains(t, err, "reached Dataset end after 4 steps")
	require.Equal(t, trainableValues(t, ref), trainableValues(t, m))

	// A loss trained down to a tiny average that rises to an ordinary value is no divergence.
	small, err := peft.NewTrainer(pefttest.NewModel(t, newLoRA(t)), cfg)
	require.NoError(t, err)
	batches := scaledBatches(6, -1, 1)
	for i := range 4 {
		tensors.MutableFlatData(batches[i].Labels[1], func(f []float32) {
			for j := range f {
				f[j] = 1e-5
			}
		})
	}
	_, err = small.Train(peft.NewDataset("train", batches, true))
	require.NoError(t, err)

	cfg.DivergenceFactor = -1
	off, err := peft.NewTrainer(pefttest.NewModel(t, newLoRA(t)), cfg)
	require.NoError(t, err)
	_, err = off.Train(peft.NewDataset("train", scaledBatches(6, 4, 1e4), true))
	require.NoError(t, err)
}

// A learning rate far too high is refused at the first step, before it changes anything.
func TestTrainingStopsOnAHugeLearningRate(t *testing.T) {
	for _, lr := range []float64{1e6, 1e38} {
		m := pefttest.NewModel(t, newLoRA(t))
		before := trainableValues(t, m)
		trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 30, LearningRate: lr, Loss: peft.CrossEntropy, Progress: peft.ProgressOff})
		require.NoError(t, err)
		_, err = trainer.Train(peft.NewDataset("train", pefttest.ToyBatches(3, 1), true))
		require.ErrorContains(t, err, "training stopped at step 1: the ")
		require.ErrorContains(t, err, "the step was not applied and the weights are those after step 0: lower the learning rate")
		require.Equal(t, before, trainableValues(t, m), "lr %g", lr)
	}
}

func TestTrainingStopsOnNaN(t *testing.T) {
	cfg := peft.TrainConfig{Steps: 5, LearningRate: 1e-2, Decay: peft.ConstantDecay, Loss: scaledLoss, Progress: peft.ProgressOff}

	m := pefttest.NewModel(t, newLoRA(t))
	trainer, err := peft.NewTrainer(m, cfg)
	require.NoError(t, err)
	losses, err := trainer.Train(peft.NewDataset("train", nanBatches(5, 2), true))
	require.ErrorContains(t, err, "training stopped at step 3: the loss is NaN (the step was not applied)")
	require.Len(t, losses, 2, "the losses of steps 1 and 2")
	for _, l := range losses {
		require.False(t, math.IsNaN(l) || math.IsInf(l, 0))
	}
	require.Equal(t, losses, trainer.Losses())

	// The weights are those after step 2: the same as a model trained on the first two batches
	// only (its dataset then ends, which stops the loop with another error).
	ref := pefttest.NewModel(t, newLoRA(t))
	refTrainer, err := peft.NewTrainer(ref, cfg)
	require.NoError(t, err)
	refLosses, err := refTrainer.Train(peft.NewDataset("train", nanBatches(2, -1), false))
	require.ErrorContains(t, err, "reached Dataset end after 2 steps")
	require.Equal(t, losses, refLosses)
	require.Equal(t, trainableValues(t, ref), trainableValues(t, m), "the NaN step changed the weights")
	require.NotEqual(t, trainableValues(t, pefttest.NewModel(t, newLoRA(t))), trainableValues(t, m), "two steps moved nothing")
}

func TestProgressLines(t *testing.T) {
	for _, tc := range []struct {
		name     string
		progress peft.Progress
		steps    int
		logEvery int
		want     []int // steps logged
	}{
		{"every 2 and the last", peft.ProgressLines, 5, 2, []int{2, 4, 5}},
		{"default: every Steps/10, at least 1", peft.ProgressLines, 3, 0, []int{1, 2, 3}},
		{"auto logs lines to a writer that is not a terminal", peft.ProgressAuto, 4, 4, []int{4}},
		{"off", peft.ProgressOff, 3, 1, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := pefttest.NewModel(t, newHead("score"))
			var out bytes.Buffer
			trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: tc.steps, LearningRate: 1e-2, Loss: peft.CrossEntropy,
				Progress: tc.progress, LogEvery: tc.logEvery, Output: &out})
			require.NoError(t, err)
			require.Zero(t, trainer.MedianStepTime())
			losses, err := trainer.Train(peft.NewDataset("train", pefttest.ToyBatches(4, 3), true))
			require.NoError(t, err)
			require.Len(t, losses, tc.steps)
			require.Positive(t, trainer.MedianStepTime())
			var want strings.Builder
			for _, step := range tc.want {
				fmt.Fprintf(&want, "head step %d/%d  loss %.4f\n", step, tc.steps, losses[step-1])
			}
			require.Equal(t, want.String(), out.String())
		})
	}
}

// crossEntropyOf computes the mean cross-entropy and the accuracy of logits [b, 2] against labels
// [b, 1] in Go.
func crossEntropyOf(logits [][]float32, labels [][]int32) (loss, accuracy float64) {
	for i, row := range logits {
		lse := logSumExp(float64(row[0]), float64(row[1]))
		loss += lse - float64(row[labels[i][0]])
		predicted := int32(0)
		if row[1] > row[0] {
			predicted = 1
		}
		if predicted == labels[i][0] {
			accuracy++
		}
	}
	return loss / float64(len(logits)), accuracy / float64(len(logits))
}

func TestEvaluate(t *testing.T) {
	m := pefttest.NewModel(t, newHead("score"))
	// A head with large weights, so accuracy is not a coin flip and the loss is far from log 2.
	w := m.Context().GetVariableByScopeAndName("/score/dense", "weights")
	require.NoError(t, peft.SetFloat32s(w, peft.Normal(peft.NewRand(4), 64, 3)))
	batches := pefttest.ToyBatches(3, 7)
	var wantLoss, wantAcc float64
	for _, b := range batches {
		out, err := m.Call(b.Inputs...)
		require.NoError(t, err)
		loss, acc := crossEntropyOf(out[0].Value().([][]float32), b.Labels[0].Value().([][]int32))
		wantLoss += loss / float64(len(batches))
		wantAcc += acc / float64(len(batches))
	}
	eval := peft.NewDataset("eval", batches, false)
	for _, accuracy := range []bool{false, true} {
		t.Run(fmt.Sprintf("accuracy=%v", accuracy), func(t *testing.T) {
			trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 1, Loss: peft.CrossEntropy, Accuracy: accuracy, Progress: peft.ProgressOff})
			require.NoError(t, err)
			for range 2 { // Evaluate resets the dataset: twice gives the same result
				result, err := trainer.Evaluate(eval)
				require.NoError(t, err)
				require.InDelta(t, wantLoss, result.Loss, 1e-5)
				if accuracy {
					require.InDelta(t, wantAcc, result.Accuracy, 1e-6)
				} else {
					require.True(t, math.IsNaN(result.Accuracy), "accuracy off: NaN, got %v", result.Accuracy)
				}
			}
		})
	}
	t.Logf("eval loss %.4f, accuracy %.3f", wantLoss, wantAcc)
}

// Training changes only what the method trains, counts no optimizer state in the report, and
// refuses a merged model.
func TestTrainTouchesOnlyTrainable(t *testing.T) {
	l := newLoRA(t)
	m := pefttest.NewModel(t, l)
	report := m.Report()
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 3, LearningRate: 1e-2, Loss: peft.CrossEntropy, Progress: peft.ProgressOff})
	require.NoError(t, err)
	_, err = trainer.Train(peft.NewDataset("train", pefttest.ToyBatches(3, 3), true))
	require.NoError(t, err)
	require.Equal(t, report, m.Report(), "optimizer and trainer variables do not count")
	// Adam keeps two float32 moments per trained value.
	require.EqualValues(t, 2*4*report.Trainable, peft.OptimizerStateBytes(m.Context()))

	require.NoError(t, m.Merge())
	_, err = trainer.Train(peft.NewDataset("train", pefttest.ToyBatches(1, 3), true))
	require.ErrorIs(t, err, peft.ErrMerged)
	require.NoError(t, m.Unmerge())
}
