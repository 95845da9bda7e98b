// Package pefttest holds the checks every fine-tuning method must pass, run by each method
// package's tests on the same tiny Llama model and toy task, so that the methods are held to one
// standard without copies of the same test in every package.
package pefttest

import (
	"io/fs"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/shapes"
	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/gomlx/gomlx/pkg/ml/context"
	"github.com/gomlx/gopjrt/dtypes"
	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/backend"
	"peft/peft/llama"
	"peft/peft/safetensors"
	"peft/peft/stories260k"
)

// Batch and Seq are the toy task's batch size and sequence length.
const (
	Batch = 16
	Seq   = 8
)

// Config is the tiny model the checks run on.
func Config() llama.Config { return llama.Tiny() }

// NewModel builds the tiny Llama classifier (2 classes, seed 1) in a fresh context with method
// applied (nil for the base model).
func NewModel(t testing.TB, method peft.Method) *peft.Model {
	t.Helper()
	m, err := newModel(method)
	require.NoError(t, err)
	return m
}

func newModel(method peft.Method) (*peft.Model, error) {
	return newLlama(Config(), 2, method, Batch, Seq)
}

// NewLlama builds a Llama with cfg (seed 1) in a fresh context, as a classifier (numLabels > 0) or
// a causal language model (numLabels = 0), with method applied (nil: the base model), traced with
// [batch, seq] token ids.
func NewLlama(t testing.TB, cfg llama.Config, numLabels int, method peft.Method, batch, seq int) *peft.Model {
	t.Helper()
	m, err := newLlama(cfg, numLabels, method, batch, seq)
	require.NoError(t, err)
	return m
}

func newLlama(cfg llama.Config, numLabels int, method peft.Method, batch, seq int) (*peft.Model, error) {
	b, err := backend.Get()
	if err != nil {
		return nil, err
	}
	ctx := context.New()
	if err := llama.Init(ctx, cfg, numLabels, 1); err != nil {
		return nil, err
	}
	fn := llama.CausalLM(cfg)
	if numLabels > 0 {
		fn = llama.Classifier(cfg, numLabels)
	}
	return peft.NewModel(b, ctx, fn, method, shapes.Make(dtypes.Int32, batch, seq))
}

// NewModelErr is NewModel returning the error, for checks of bad configurations.
func NewModelErr(method peft.Method) error {
	_, err := newModel(method)
	return err
}

// ToyBatches returns n batches of the toy task: sequences of Seq token ids with words of two
// kinds, "good" (ids 10–19) and "bad" (ids 20–29), among fillers (30–63); the label is 1 when
// good words outnumber bad ones. Labels are [Batch, 1] int32.
func ToyBatches(n int, seed uint64) []peft.Batch {
	rng := peft.NewRand(seed)
	batches := make([]peft.Batch, n)
	for bi := range batches {
		ids := make([]int32, Batch*Seq)
		labels := make([]int32, Batch)
		for i := range Batch {
			good, bad := 0, 0
			for good == bad {
				good, bad = 0, 0
				for j := range Seq {
					switch rng.IntN(3) {
					case 0:
						ids[i*Seq+j] = int32(10 + rng.IntN(10))
						good++
					case 1:
						ids[i*Seq+j] = int32(20 + rng.IntN(10))
						bad++
					default:
						ids[i*Seq+j] = int32(30 + rng.IntN(34))
					}
				}
			}
			if good > bad {
				labels[i] = 1
			}
		}
		batches[bi] = peft.Batch{
			Inputs: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(ids, Batch, Seq)},
			Labels: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(labels, Batch, 1)},
		}
	}
	return batches
}

// Logits runs m on the first toy batch and returns the logits.
func Logits(t testing.TB, m *peft.Model) [][]float32 {
	t.Helper()
	out, err := m.Call(ToyBatches(1, 99)[0].Inputs...)
	require.NoError(t, err)
	return out[0].Value().([][]float32)
}

// CheckIdentityAtInit checks that a freshly applied method leaves the model's outputs bit for bit
// equal to the base model's, as methods whose update starts at zero must.
func CheckIdentityAtInit(t *testing.T, method peft.Method) {
	t.Helper()
	base := Logits(t, NewModel(t, nil))
	with := Logits(t, NewModel(t, method))
	require.Equal(t, base, with, "outputs differ from the base model at initialization")
}

// Snapshot copies the values of the given variables.
func Snapshot(t testing.TB, vars []*context.Variable) map[*context.Variable][]byte {
	t.Helper()
	snap := map[*context.Variable][]byte{}
	for _, v := range vars {
		value, err := v.Value()
		require.NoError(t, err)
		require.NoError(t, value.ConstBytes(func(data []byte) { snap[v] = append([]byte(nil), data...) }))
	}
	return snap
}

// Train trains m on the toy task for steps and returns the evaluation loss and accuracy before
// and after on held-out batches.
func Train(t testing.TB, m *peft.Model, steps int, lr float64) (before, after peft.EvalResult) {
	t.Helper()
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{
		Steps: steps, LearningRate: lr, WarmupSteps: steps / 10, Loss: peft.CrossEntropy,
		Accuracy: true, Progress: peft.ProgressOff,
	})
	require.NoError(t, err)
	eval := peft.NewDataset("eval", ToyBatches(4, 7), false)
	before, err = trainer.Evaluate(eval)
	require.NoError(t, err)
	_, err = trainer.Train(peft.NewDataset("train", ToyBatches(32, 3), true))
	require.NoError(t, err)
	after, err = trainer.Evaluate(eval)
	require.NoError(t, err)
	return before, after
}

// CheckTrainingLearns trains the method on the toy task and checks that the held-out loss fell
// below maxRatio of where it started, that the method's variables moved and that every base
// variable it does not train is bit-identical afterwards.
func CheckTrainingLearns(t *testing.T, method peft.Method, steps int, lr, maxRatio float64) (before, after peft.EvalResult) {
	t.Helper()
	m := NewModel(t, method)
	trainable := map[*context.Variable]bool{}
	var trainVars []*context.Variable
	for _, tv := range m.TrainableVariables() {
		trainable[tv.Variable] = true
		trainVars = append(trainVars, tv.Variable)
	}
	var frozen []*context.Variable
	for _, v := range m.Layout().BaseVariables {
		if !trainable[v] {
			frozen = append(frozen, v)
		}
	}
	frozenBefore := Snapshot(t, frozen)
	trainBefore := Snapshot(t, trainVars)
	before, after = Train(t, m, steps, lr)
	t.Logf("%s: eval loss %.4f → %.4f, accuracy %.3f → %.3f", method.Name(), before.Loss, after.Loss, before.Accuracy, after.Accuracy)
	require.False(t, math.IsNaN(after.Loss))
	require.Less(t, after.Loss, before.Loss*maxRatio, "training did not lower the loss enough")
	require.Equal(t, frozenBefore, Snapshot(t, frozen), "frozen base weights changed during training")
	moved := false
	for v, data := range Snapshot(t, trainVars) {
		if string(data) != string(trainBefore[v]) {
			moved = true
		}
	}
	require.True(t, moved, "no trainable variable changed")
	return before, after
}

// CheckSaveLoad trains the method a few steps, saves it, loads it into a fresh model built with
// newMethod and checks that the outputs agree bit for bit; then checks that loading from a
// missing, truncated or corrupt folder fails and leaves the model unchanged.
func CheckSaveLoad(t *testing.T, newMethod func() peft.Method) {
	t.Helper()
	m := NewModel(t, newMethod())
	Train(t, m, 5, 1e-2)
	want := Logits(t, m)
	dir := filepath.Join(t.TempDir(), "state")
	require.NoError(t, m.Save(dir))

	fresh := NewModel(t, newMethod())
	freshLogits := Logits(t, fresh)
	require.NotEqual(t, want, freshLogits, "training changed nothing, the round trip proves nothing")
	require.NoError(t, fresh.Load(dir))
	require.Equal(t, want, Logits(t, fresh), "outputs after load differ")

	// Bad folders: each load fails with an error and changes nothing.
	other := NewModel(t, newMethod())
	otherLogits := Logits(t, other)
	require.Error(t, other.Load(filepath.Join(t.TempDir(), "missing")))
	stateFile, configFile := SavedFiles(t, dir)
	stateData, err := os.ReadFile(filepath.Join(dir, stateFile))
	require.NoError(t, err)
	for name, mutate := range map[string]func(dir string){
		"truncated": func(d string) {
			require.NoError(t, os.WriteFile(filepath.Join(d, stateFile), stateData[:len(stateData)/2], 0o644))
		},
		"corrupt header": func(d string) {
			bad := append([]byte(nil), stateData...)
			copy(bad[8:], "{{{{")
			require.NoError(t, os.WriteFile(filepath.Join(d, stateFile), bad, 0o644))
		},
		"corrupt config": func(d string) {
			require.NoError(t, os.WriteFile(filepath.Join(d, configFile), []byte("{not json"), 0o644))
		},
		"missing tensors": func(d string) { require.NoError(t, os.Remove(filepath.Join(d, stateFile))) },
	} {
		bad := filepath.Join(t.TempDir(), "bad")
		require.NoError(t, os.CopyFS(bad, os.DirFS(dir)))
		mutate(bad)
		err := other.Load(bad)
		require.Error(t, err, name)
		t.Logf("%s: %v", name, err)
		require.Equal(t, otherLogits, Logits(t, other), "a failed load (%s) changed the model", name)
	}
}

// SavedFiles returns the tensor file and the configuration file of a folder Model.Save wrote, in
// whichever layout the method saves: Hugging Face PEFT's (adapter_model.safetensors,
// adapter_config.json) or the SDK's own (peft_state.safetensors or, for a whole model,
// model.safetensors, with peft_config.json).
func SavedFiles(t testing.TB, dir string) (tensors, config string) {
	t.Helper()
	_, format, err := peft.FindAdapter(dir, "")
	require.NoError(t, err)
	if format == peft.FormatPEFT {
		return peft.AdapterWeightsFile, peft.AdapterConfigFile
	}
	if _, err := os.Stat(filepath.Join(dir, peft.ModelWeightsFile)); err == nil {
		return peft.ModelWeightsFile, peft.ConfigFile
	}
	return peft.StateFile, peft.ConfigFile
}

// freshProcessEnv tells a test binary started by CheckLoadInFreshProcess to act as the child.
const freshProcessEnv = "PEFT_FRESH_PROCESS_STATE"

// CheckLoadInFreshProcess trains the method a few steps on the tiny model and saves it, starts
// the test binary again (running only the test named testName, which must call this function
// too) to rebuild the same base model with newMethod, load the state and write its logits, and
// checks that they are bit for bit the logits computed here: a saved state reproduces the model
// in another process.
func CheckLoadInFreshProcess(t *testing.T, testName string, newMethod func() peft.Method) {
	t.Helper()
	if dir := os.Getenv(freshProcessEnv); dir != "" {
		// Child: load and write the logits' bytes.
		fresh := NewModel(t, newMethod())
		require.NoError(t, fresh.Load(dir))
		out, err := fresh.Call(ToyBatches(1, 99)[0].Inputs...)
		require.NoError(t, err)
		require.NoError(t, out[0].ConstBytes(func(data []byte) {
			require.NoError(t, os.WriteFile(filepath.Join(dir, "logits.bin"), data, 0o644))
		}))
		return
	}
	m := NewModel(t, newMethod())
	Train(t, m, 5, 1e-2)
	dir := t.TempDir()
	require.NoError(t, m.Save(dir))
	cmd := exec.Command(os.Args[0], "-test.run=^"+testName+"$", "-test.count=1")
	cmd.Env = append(os.Environ(), freshProcessEnv+"="+dir)
	output, err := cmd.CombinedOutput()
	require.NoError(t, err, "child process: %s", output)
	got, err := os.ReadFile(filepath.Join(dir, "logits.bin"))
	require.NoError(t, err, "child process wrote no logits: %s", output)
	out, err := m.Call(ToyBatches(1, 99)[0].Inputs...)
	require.NoError(t, err)
	require.NoError(t, out[0].ConstBytes(func(want []byte) {
		require.Equal(t, want, got, "logits loaded in a fresh process differ")
	}))
}

// CheckMergeUnmerge checks a model whose method's update is not zero: merged outputs agree with
// the unmerged ones within 1e-5, merging twice and saving while merged are errors, and Unmerge
// restores every base weight and the outputs bit for bit.
func CheckMergeUnmerge(t *testing.T, m *peft.Model) {
	t.Helper()
	unmerged := Logits(t, m)
	weights := map[string][]float32{}
	for _, layer := range m.Layout().Linears {
		w, err := peft.Float32s(layer.Weights(m.Context()))
		require.NoError(t, err)
		weights[layer.Path] = w
	}
	require.NoError(t, m.Merge())
	require.True(t, m.Merged())
	merged := Logits(t, m)
	for i := range merged {
		require.InDeltaSlice(t, unmerged[i], merged[i], 1e-5)
	}
	require.Error(t, m.Merge(), "merging twice must fail")
	require.ErrorIs(t, m.Save(t.TempDir()), peft.ErrMerged)

	require.NoError(t, m.Unmerge())
	for _, layer := range m.Layout().Linears {
		w, err := peft.Float32s(layer.Weights(m.Context()))
		require.NoError(t, err)
		require.Equal(t, weights[layer.Path], w, "unmerge did not restore %s exactly", layer.Path)
	}
	require.Equal(t, unmerged, Logits(t, m))
}

// SetRandomB draws every LoRA factor B of m (the variables named "B") from N(0, std²) with
// seed, so that the adapter changes the model (B starts at zero).
func SetRandomB(t testing.TB, m *peft.Model, seed uint64, std float64) {
	t.Helper()
	rng := peft.NewRand(seed)
	for _, tv := range m.TrainableVariables() {
		if v := tv.Variable; v.Name() == "B" {
			require.NoError(t, peft.SetFloat32s(v, peft.Normal(rng, v.Shape().Size(), std)))
		}
	}
}

// StoriesModel loads the embedded stories260K as a causal language model, traced with [1, 1]
// token ids, with method applied (nil: the base model).
func StoriesModel(t testing.TB, method peft.Method) (llama.Config, *peft.Model) {
	t.Helper()
	return FolderModel(t, stories260k.FS(), method, 1)
}

// FolderModel loads the Hugging Face model folder fsys (llama.LoadPretrainedFS) and applies
// method (nil for none) as a causal LM on inputs of one sequence of seqLen tokens.
func FolderModel(t testing.TB, fsys fs.FS, method peft.Method, seqLen int) (llama.Config, *peft.Model) {
	t.Helper()
	b, err := backend.Get()
	require.NoError(t, err)
	ctx := context.New()
	cfg, err := llama.LoadPretrainedFS(ctx, fsys)
	require.NoError(t, err)
	m, err := peft.NewModel(b, ctx, llama.CausalLM(cfg), method, shapes.Make(dtypes.Int32, 1, seqLen))
	require.NoError(t, err)
	return cfg, m
}

// WritePlainPEFT copies the Hugging Face PEFT adapter folder from (written by Model.Save) to the
// folder to as PEFT itself would have written it: the same configuration and tensors, with only
// {"format": "pt"} as metadata (no record of this SDK's).
func WritePlainPEFT(t testing.TB, from, to string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(to, 0o755))
	file, err := safetensors.Read(filepath.Join(from, peft.AdapterWeightsFile))
	require.NoError(t, err)
	require.NoError(t, safetensors.Write(filepath.Join(to, peft.AdapterWeightsFile), file.Tensors, map[string]string{"format": "pt"}))
	config, err := os.ReadFile(filepath.Join(from, peft.AdapterConfigFile))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(to, peft.AdapterConfigFile), config, 0o644))
}

// Call runs m on ids (and mask, if not nil), both [batch][seq], and returns its first output.
func Call(t testing.TB, m *peft.Model, ids, mask [][]int32) *tensors.Tensor {
	t.Helper()
	inputs := []*tensors.Tensor{tensors.FromValue(ids)}
	if mask != nil {
		inputs = append(inputs, tensors.FromValue(mask))
	}
	out, err := m.Call(inputs...)
	require.NoError(t, err)
	return out[0]
}

// GreedyReference continues prompt by steps tokens the slow, obvious way: the causal language
// model m runs on the whole unpadded sequence at every step and the argmax of the last logits is
// appended (the lowest id among ties). What generation must reproduce.
func GreedyReference(t testing.TB, m *peft.Model, prompt []int, steps int) []int {
	t.Helper()
	seq := make([]int32, len(prompt))
	for i, id := range prompt {
		seq[i] = int32(id)
	}
	var out []int
	for range steps {
		logits := Call(t, m, [][]int32{seq}, nil).Value().([][][]float32)[0]
		last := logits[len(seq)-1]
		best := 0
		for i := range last {
			if last[i] > last[best] {
				best = i
			}
		}
		out = append(out, best)
		seq = append(seq, int32(best))
	}
	return out
}

// CheckSteersLanguageModel checks that method alone, on a frozen random causal language model,
// learns to make it predict one token (7) after any input: held-out loss below 1/factor of where
// it started after 40 steps at learning rate 0.1, with every trainable variable moved. The
// methods that only add inputs or attention positions (prompt and prefix tuning) are held to it,
// where a classifier's head would do the learning for them.
func CheckSteersLanguageModel(t *testing.T, method peft.Method, factor float64) {
	t.Helper()
	cfg := Config()
	m := NewLlama(t, cfg, 0, method, Batch, Seq)
	// A random head of standard deviation 0.02 can barely favour any token (its logits stay within
	// about ±0.6 whatever the hidden state), so give it the scale of a trained one: std 0.5.
	head := m.Layout().Linear("lm_head").Weights(m.Context())
	values, err := peft.Float32s(head)
	require.NoError(t, err)
	for i := range values {
		values[i] *= 25
	}
	require.NoError(t, peft.SetFloat32s(head, values))
	batches := func(n int, seed uint64) []peft.Batch {
		rng := peft.NewRand(seed)
		out := make([]peft.Batch, n)
		for i := range out {
			ids := make([]int32, Batch*Seq)
			labels := make([]int32, len(ids))
			for j := range ids {
				ids[j], labels[j] = int32(rng.IntN(cfg.VocabSize)), 7
			}
			out[i] = peft.Batch{
				Inputs: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(ids, Batch, Seq)},
				Labels: []*tensors.Tensor{tensors.FromFlatDataAndDimensions(labels, Batch, Seq)},
			}
		}
		return out
	}
	trainer, err := peft.NewTrainer(m, peft.TrainConfig{Steps: 40, LearningRate: 0.1, Loss: peft.CrossEntropy, Progress: peft.ProgressOff})
	require.NoError(t, err)
	eval := peft.NewDataset("eval", batches(2, 7), false)
	before, err := trainer.Evaluate(eval)
	require.NoError(t, err)
	trainVars := peft.VariablesOf(m.TrainableVariables())
	initial := Snapshot(t, trainVars)
	_, err = trainer.Train(peft.NewDataset("train", batches(8, 3), true))
	require.NoError(t, err)
	after, err := trainer.Evaluate(eval)
	require.NoError(t, err)
	t.Logf("%s: held-out loss %.4f → %.4f", method.Name(), before.Loss, after.Loss)
	require.Less(t, after.Loss, before.Loss/factor)
	for v, data := range Snapshot(t, trainVars) {
		require.NotEqual(t, string(initial[v]), string(data), "%s did not move", v.ScopeAndName())
	}
}
