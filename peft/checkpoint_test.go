package peft_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/data"
	"peft/peft/pefttest"
	"peft/peft/tokenizer"
)

// storiesExamples are prompt/completion examples of unequal lengths on stories260K's tokenizer,
// so that micro-batches carry unequal numbers of loss tokens.
func storiesExamples(t *testing.T, n int) []data.Example {
	t.Helper()
	tok, err := tokenizer.Load(filepath.Join("stories260k", "testdata", "stories260K"))
	require.NoError(t, err)
	var lines string
	for i := range n {
		lines += fmt.Sprintf(`{"prompt": "Once upon a time, there was a %s", "completion": " named %s. %s"}`+"\n",
			[]string{"girl", "boy", "dog", "cat", "bird"}[i%5], []string{"Lily", "Tom", "Sue", "Max"}[i%4],
			[]string{"She was happy.", "He liked to play in the park with his ball.", "It was a sunny day and they ran.", "The end."}[i%4])
	}
	f, err := data.ParseJSONL("train.jsonl", strings.NewReader(lines))
	require.NoError(t, err)
	examples, _, err := data.Tokenize(f, tok, data.Options{SeqLen: 32, EOS: tok.EOS()})
	require.NoError(t, err)
	return examples
}

func newLoRAWithDropout(t *testing.T, dropout float64) peft.Method {
	t.Helper()
	cfg := lora.DefaultConfig()
	cfg.Dropout = dropout
	method, err := lora.New(cfg)
	require.NoError(t, err)
	return method
}

func lmTrainer(t *testing.T, m *peft.Model, steps, accum int) *peft.Trainer {
	t.Helper()
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: steps, LearningRate: 1e-2, WarmupSteps: min(2, steps-1), Loss: peft.NextTokenLoss,
		GradAccum: accum, Progress: peft.ProgressOff})
	require.NoError(t, err)
	return trainer
}

// A step accumulated over K batches of B rows equals one step on the batch of those K·B rows,
// though the batches hold unequal numbers of loss tokens: each is weighted by its tokens.
func TestGradAccumEqualsLargerBatch(t *testing.T) {
	examples := storiesExamples(t, 24)
	small := &data.Loader{Examples: examples, Batch: 2, SeqLen: 32}
	large := &data.Loader{Examples: examples, Batch: 6, SeqLen: 32}
	const steps = 4
	_, accumulated := pefttest.StoriesModel(t, newLoRAWithDropout(t, 0))
	smallStream, err := data.NewStream("small", small)
	require.NoError(t, err)
	_, err = lmTrainer(t, accumulated, steps, 3).Train(smallStream)
	require.NoError(t, err)
	require.Equal(t, 3*steps, smallStream.Position())

	_, one := pefttest.StoriesModel(t, newLoRAWithDropout(t, 0))
	largeStream, err := data.NewStream("large", large)
	require.NoError(t, err)
	_, err = lmTrainer(t, one, steps, 1).Train(largeStream)
	require.NoError(t, err)

	want, got := trainableValues(t, one), trainableValues(t, accumulated)
	require.Len(t, got, len(want))
	worst := 0.0
	for name, w := range want {
		for i := range w {
			worst = max(worst, float64(abs32(got[name][i]-w[i])))
		}
	}
	t.Logf("max |difference| of the trained values after %d steps: %.3g", steps, worst)
	require.Less(t, worst, 1e-5)

	// Weighting every batch alike (the mean of the batch means) would not give that step.
	_, unweighted := pefttest.StoriesModel(t, newLoRAWithDropout(t, 0))
	stream, err := data.NewStream("small", small)
	require.NoError(t, err)
	sameWeight, err := peft.MultiTask(peft.Task{Name: "lm", Loss: peft.NextTokenLoss, Weight: 1, Labels: []int{0, 1, 2}, Predictions: []int{0}})
	require.NoError(t, err)
	trainer, err := peft.NewTrainer(unweighted, peft.TrainConfig{Steps: steps, LearningRate: 1e-2, WarmupSteps: 2,
		Loss: sameWeight, GradAccum: 3, Progress: peft.ProgressOff})
	require.NoError(t, err)
	_, err = trainer.Train(stream)
	require.NoError(t, err)
	off := 0.0
	for name, w := range want {
		for i, x := range trainableValues(t, unweighted)[name] {
			off = max(off, float64(abs32(x-w[i])))
		}
	}
	t.Logf("weighting every batch alike instead: max |difference| %.3g", off)
	require.Greater(t, off, 10*worst)
}

func abs32(x float32) float32 {
	if x < 0 {
		return -x
	}
	return x
}

// A run checkpointed after 3 of 7 steps and resumed in a fresh context (a new model from the
// same base, a new trainer, the data stream sought to the step) ends with the same values, bit
// for bit, as the run never interrupted: LoRA with dropout (random-number state), warmup and
// decay (schedule position), Adam's moments and gradient accumulation all carry over.
func TestCheckpointResumesExactly(t *testing.T) {
	examples := storiesExamples(t, 20)
	const steps, accum, at = 7, 2, 3
	loader := func() *data.Loader {
		return &data.Loader{Examples: examples, Batch: 2, SeqLen: 32, Shuffle: true, Seed: 5}
	}
	_, whole := pefttest.StoriesModel(t, newLoRAWithDropout(t, 0.1))
	stream, err := data.NewStream("train", loader())
	require.NoError(t, err)
	wholeTrainer := lmTrainer(t, whole, steps, accum)
	_, err = wholeTrainer.Train(stream)
	require.NoError(t, err)

	_, first := pefttest.StoriesModel(t, newLoRAWithDropout(t, 0.1))
	stream, err = data.NewStream("train", loader())
	require.NoError(t, err)
	trainer := lmTrainer(t, first, steps, accum)
	_, err = trainer.TrainSteps(stream, at)
	require.NoError(t, err)
	dir := filepath.Join(t.TempDir(), "checkpoint-3")
	require.NoError(t, trainer.SaveCheckpoint(dir, map[string]int{"position": stream.Position()}))
	for _, f := range []string{peft.TrainerStateFile, peft.TrainerTensorsFile, peft.AdapterConfigFile, peft.AdapterWeightsFile} {
		require.FileExists(t, filepath.Join(dir, f))
	}

	_, resumed := pefttest.StoriesModel(t, newLoRAWithDropout(t, 0.1))
	trainer = lmTrainer(t, resumed, steps, accum)
	var extra map[string]int
	require.NoError(t, trainer.LoadCheckpoint(dir, &extra))
	require.Equal(t, at, trainer.Step())
	require.Equal(t, at*accum, extra["position"])
	stream, err = data.NewStream("train", loader())
	require.NoError(t, err)
	stream.Seek(extra["position"])
	losses, err := trainer.Train(stream)
	require.NoError(t, err)
	require.Equal(t, wholeTrainer.Losses(), losses)
	require.Equal(t, trainableValues(t, whole), trainableValues(t, resumed))
}

// A checkpoint of another method configuration, another accumulation or a damaged one is
// refused, and the model is unchanged.
func TestLoadCheckpointRefuses(t *testing.T) {
	examples := storiesExamples(t, 8)
	_, m := pefttest.StoriesModel(t, newLoRAWithDropout(t, 0))
	stream, err := data.NewStream("train", &data.Loader{Examples: examples, Batch: 2, SeqLen: 32})
	require.NoError(t, err)
	trainer := lmTrainer(t, m, 4, 1)
	_, err = trainer.TrainSteps(stream, 2)
	require.NoError(t, err)
	dir := filepath.Join(t.TempDir(), "checkpoint-2")
	require.NoError(t, trainer.SaveCheckpoint(dir, nil))

	_, other := pefttest.StoriesModel(t, newLoRAWithDropout(t, 0))
	before := trainableValues(t, other)
	err = lmTrainer(t, other, 4, 2).LoadCheckpoint(dir, nil)
	require.ErrorContains(t, err, "the checkpoint accumulates 1 batches per step, this trainer 2")
	err = lmTrainer(t, other, 1, 1).LoadCheckpoint(dir, nil)
	require.ErrorContains(t, err, "past this run's 1 steps")

	cfg := lora.DefaultConfig()
	cfg.Rank = 4
	method, err := lora.New(cfg)
	require.NoError(t, err)
	_, rank4 := pefttest.StoriesModel(t, method)
	err = lmTrainer(t, rank4, 4, 1).LoadCheckpoint(dir, nil)
	require.ErrorContains(t, err, "lora/A is (Float32)[64 8], the model's variable is (Float32)[64 4]")

	require.NoError(t, os.Truncate(filepath.Join(dir, peft.TrainerTensorsFile), 100))
	err = lmTrainer(t, other, 4, 1).LoadCheckpoint(dir, nil)
	require.ErrorContains(t, err, peft.TrainerTensorsFile)
	require.Equal(t, before, trainableValues(t, other))
}
