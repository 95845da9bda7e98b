package experiment_test

import (
	"bytes"
	"math"
	"strings"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/lora"
	"peft/peft"
	"peft/peft/backend"
	"peft/peft/experiment"
	"peft/peft/reviews"
)

func loadStories(t *testing.T) *experiment.Pretrained {
	t.Helper()
	b, err := backend.Get()
	require.NoError(t, err)
	p, err := experiment.LoadStories260K(b)
	require.NoError(t, err)
	require.Equal(t, 512, p.Config.VocabSize)
	return p
}

func int32s(t *testing.T, x *tensors.Tensor) []int32 {
	t.Helper()
	var out []int32
	require.NoError(t, x.ConstFlatData(func(flat any) { out = append(out, flat.([]int32)...) }))
	return out
}

// The corpus is deterministic per seed, differs between seeds, and is in the template's style
// with invented words the pretrained model's stories never had.
func TestZorblatStories(t *testing.T) {
	a, b := experiment.ZorblatStories(20, 1), experiment.ZorblatStories(20, 1)
	require.Equal(t, a, b)
	require.NotEqual(t, a, experiment.ZorblatStories(20, 2))
	for _, s := range a {
		require.True(t, strings.HasPrefix(s, "Once upon a time, a "), s)
		require.Contains(t, s, " named ")
		require.Contains(t, s, "forever.")
	}
	require.Contains(t, strings.Join(a, " "), "zorblat")
}

// LMBatches packs <s> text </s> of every text into rows and batches, with labels = inputs and a
// full mask; too little text is an error.
func TestLMBatches(t *testing.T) {
	p := loadStories(t)
	tok := p.Tokenizer
	texts := []string{"Once upon a time, a zorblat named Quix.", "Zib zab!", "The end of the story is here at last."}
	var stream []int32
	for _, text := range texts {
		for _, id := range tok.Encode(text) {
			stream = append(stream, int32(id))
		}
		stream = append(stream, int32(tok.EOS()))
	}
	batches, err := experiment.LMBatches(tok, texts, 2, 4)
	require.NoError(t, err)
	require.Len(t, batches, len(stream)/8)
	for i, b := range batches {
		require.Len(t, b.Inputs, 2)
		require.Equal(t, []int{2, 4}, b.Inputs[0].Shape().Dimensions)
		require.Equal(t, stream[i*8:(i+1)*8], int32s(t, b.Inputs[0]))
		require.Equal(t, []int32{1, 1, 1, 1, 1, 1, 1, 1}, int32s(t, b.Inputs[1]))
		require.Equal(t, b.Inputs, b.Labels)
	}
	require.Equal(t, int32(tok.BOS()), int32s(t, batches[0].Inputs[0])[0])

	_, err = experiment.LMBatches(tok, texts, 64, 64)
	require.ErrorContains(t, err, "do not fill one batch")
	_, err = experiment.LMBatches(tok, texts, 0, 4)
	require.Error(t, err)
}

// ReviewBatches right-pads each review's subword ids with a mask and labels it; a review longer
// than seqLen is an error rather than cut.
func TestReviewBatches(t *testing.T) {
	p := loadStories(t)
	tok := p.Tokenizer
	data := reviews.Generate(10, 3)
	seqLen := experiment.MaxReviewTokens(tok, data)
	batches, err := experiment.ReviewBatches(tok, data, 4, seqLen)
	require.NoError(t, err)
	require.Len(t, batches, 2, "the last partial batch is dropped")
	ids, mask := int32s(t, batches[0].Inputs[0]), int32s(t, batches[0].Inputs[1])
	labels := int32s(t, batches[0].Labels[0])
	require.Equal(t, []int{4, 1}, batches[0].Labels[0].Shape().Dimensions)
	for i, r := range data[:4] {
		enc := tok.Encode(r.Text)
		for j := range seqLen {
			if j < len(enc) {
				require.Equal(t, int32(enc[j]), ids[i*seqLen+j])
				require.Equal(t, int32(1), mask[i*seqLen+j])
			} else {
				require.Zero(t, ids[i*seqLen+j])
				require.Zero(t, mask[i*seqLen+j])
			}
		}
		require.Equal(t, r.Label(), labels[i])
	}
	_, err = experiment.ReviewBatches(tok, data, 4, seqLen-1)
	require.ErrorContains(t, err, "longer than seqLen")
	_, err = experiment.ReviewBatches(tok, data, 11, seqLen)
	require.ErrorContains(t, err, "do not fill one batch")
}

// NewContext gives independent copies of the pretrained weights; NewRandomContext other weights
// of the same shapes.
func TestPretrainedContexts(t *testing.T) {
	p := loadStories(t)
	a, err := p.NewContext()
	require.NoError(t, err)
	b, err := p.NewContext()
	require.NoError(t, err)
	r, err := p.NewRandomContext(0, 1)
	require.NoError(t, err)
	const scope, name = "/model/embed_tokens", "embeddings"
	va, vb, vr := a.GetVariableByScopeAndName(scope, name), b.GetVariableByScopeAndName(scope, name), r.GetVariableByScopeAndName(scope, name)
	require.NotNil(t, va)
	require.NotNil(t, vb)
	require.NotNil(t, vr)
	wa, err := peft.Float32s(va)
	require.NoError(t, err)
	wr, err := peft.Float32s(vr)
	require.NoError(t, err)
	require.Len(t, wr, len(wa))
	require.NotEqual(t, wa, wr)

	changed := make([]float32, len(wa))
	va.MustSetValue(tensors.FromFlatDataAndDimensions(changed, va.Shape().Dimensions...))
	wb, err := peft.Float32s(vb)
	require.NoError(t, err)
	require.Equal(t, wa, wb, "changing one copy leaves the others alone")
	c, err := p.NewContext()
	require.NoError(t, err)
	wc, err := peft.Float32s(c.GetVariableByScopeAndName(scope, name))
	require.NoError(t, err)
	require.Equal(t, wa, wc, "and the pretrained weights")
}

// Both runs end to end on a tiny budget: the before/after losses, checkpoints, samples and the
// tables.
func TestFineTuneRuns(t *testing.T) {
	p := loadStories(t)
	train, err := experiment.LMBatches(p.Tokenizer, experiment.ZorblatStories(4, 1), 2, 16)
	require.NoError(t, err)
	eval, err := experiment.LMBatches(p.Tokenizer, experiment.ZorblatStories(1, 2), 2, 16)
	require.NoError(t, err)
	method, err := lora.New(lora.DefaultConfig())
	require.NoError(t, err)
	lm, err := p.FineTuneLM("lora", method, train, eval, experiment.RunOptions{
		Steps: 4, LearningRate: 3e-2, Prompt: "Once upon a time,", SampleTokens: 4, Progress: peft.ProgressOff})
	require.NoError(t, err)
	require.Len(t, lm.Losses, 4)
	require.Len(t, lm.Checkpoints, 1)
	require.Less(t, lm.LossAfter, lm.LossBefore)
	require.True(t, math.IsNaN(lm.Accuracy))
	require.True(t, strings.HasPrefix(lm.SampleBefore, "Once upon a time,"), lm.SampleBefore)
	require.Greater(t, len(lm.SampleBefore), len("Once upon a time,"))
	require.Greater(t, lm.StepsPerSec, 0.0)
	var table bytes.Buffer
	require.NoError(t, experiment.WriteLMTable(&table, []*experiment.RunResult{lm}))
	lines := strings.Split(strings.TrimSpace(table.String()), "\n")
	require.Len(t, lines, 2)
	require.Contains(t, lines[0], "loss before")
	require.Contains(t, lines[1], "lora")

	data := reviews.Generate(16, 1)
	batches, err := experiment.ReviewBatches(p.Tokenizer, data, 4, experiment.MaxReviewTokens(p.Tokenizer, data))
	require.NoError(t, err)
	var results []*experiment.RunResult
	for _, random := range []bool{false, true} {
		cfg := lora.DefaultConfig()
		cfg.ModulesToSave = []string{"score"}
		method, err := lora.New(cfg)
		require.NoError(t, err)
		r, err := p.FineTuneClassifier("lora", method, batches[:3], batches[3:], experiment.RunOptions{
			Steps: 4, LearningRate: 1e-2, Checkpoints: []int{2}, RandomInit: random, Seed: 7, Progress: peft.ProgressOff})
		require.NoError(t, err)
		require.Len(t, r.Checkpoints, 2)
		require.Equal(t, []int{2, 4}, []int{r.Checkpoints[0].Step, r.Checkpoints[1].Step})
		require.Equal(t, r.Checkpoints[1].Accuracy, r.Accuracy)
		require.False(t, r.Accuracy < 0 || r.Accuracy > 1)
		require.Equal(t, map[bool]string{false: "pretrained", true: "random"}[random], r.Start)
		require.Empty(t, r.SampleAfter)
		results = append(results, r)
	}
	// The random start differs from the pretrained one.
	require.NotEqual(t, results[0].LossBefore, results[1].LossBefore)
	table.Reset()
	require.NoError(t, experiment.WriteClassifyTable(&table, results, 0.9))
	lines = strings.Split(strings.TrimSpace(table.String()), "\n")
	require.Len(t, lines, 3)
	require.Contains(t, lines[0], "acc@2")
	require.Contains(t, lines[0], "acc@4")
	require.Contains(t, lines[0], "steps to 90%")
	require.Contains(t, lines[2], "random")

	_, err = p.FineTuneClassifier("lora", nil, batches[:3], batches[3:], experiment.RunOptions{Steps: 4, Checkpoints: []int{5}})
	require.ErrorContains(t, err, "checkpoints")
}

func TestStepsToAccuracy(t *testing.T) {
	r := &experiment.RunResult{Checkpoints: []experiment.Checkpoint{{Step: 10, Accuracy: 0.5}, {Step: 20, Accuracy: 0.92}, {Step: 30, Accuracy: 0.95}}}
	require.Equal(t, 20, r.StepsToAccuracy(0.9))
	require.Equal(t, -1, r.StepsToAccuracy(0.99))
}

// Every language-modelling candidate builds, with no classifier head.
func TestLMCandidates(t *testing.T) {
	names := map[string]bool{}
	for _, c := range experiment.LMCandidates() {
		m, err := c.New(50)
		require.NoError(t, err, c.Name)
		require.NotNil(t, m)
		require.Greater(t, c.LearningRate, 0.0)
		names[c.Name] = true
	}
	for _, c := range experiment.Candidates() {
		require.True(t, names[c.Name], "LMCandidates has %s too", c.Name)
	}
}
