package generate

import (
	"math"
	"slices"
	"testing"
	"time"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/adapter"
	"peft/lora"
	"peft/peft"
	"peft/peft/llama"
	"peft/peft/pefttest"
	"peft/prompttuning"
)

// prompt is the test prompt: a BOS-like 1 and a few ids of the tiny vocabulary (64). Greedy
// decoding continues it with 12 ids, none of them the padding id 0, the first three distinct.
var prompt = []int{1, 11, 13, 15}

// newLM builds the tiny Llama language model (seed 1) with method applied, traced with batch 1.
func newLM(t testing.TB, method peft.Method) *peft.Model {
	t.Helper()
	return pefttest.NewLlama(t, llama.Tiny(), 0, method, 1, 16)
}

func generate(t testing.TB, m *peft.Model, p []int, cfg Config) []int {
	t.Helper()
	start := time.Now()
	ids, err := Generate(m, p, cfg)
	require.NoError(t, err)
	t.Logf("generated %v in %s", ids, time.Since(start).Round(time.Millisecond))
	return ids
}

func TestGreedyMatchesUnpaddedReference(t *testing.T) {
	m := newLM(t, nil)
	const steps = 13 // 4 + 13 = 17 ids: a 32-long buffer, 15 padding positions at the start
	want := pefttest.GreedyReference(t, m, prompt, steps)
	got := generate(t, m, prompt, Config{MaxNewTokens: steps})
	require.Equal(t, want, got)
	// Not a degenerate sequence (which would prove little).
	require.Greater(t, len(distinct(got)), 5, "greedy ids %v", got)

	// A one-token prompt; a generation filling its buffer exactly (16 ids, no padding); one that
	// generates the padding id 0 itself.
	require.Equal(t, pefttest.GreedyReference(t, m, []int{1}, 4), generate(t, m, []int{1}, Config{MaxNewTokens: 4}))
	require.Equal(t, pefttest.GreedyReference(t, m, prompt, 12), generate(t, m, prompt, Config{MaxNewTokens: 12}))
	zeros := []int{1, 17, 42, 5, 33}
	withZeros := generate(t, m, zeros, Config{MaxNewTokens: 12})
	require.Contains(t, withZeros, 0)
	require.Equal(t, pefttest.GreedyReference(t, m, zeros, 12), withZeros)
}

func distinct(ids []int) []int {
	s := slices.Clone(ids)
	slices.Sort(s)
	return slices.Compact(s)
}

func TestSamplingDeterminism(t *testing.T) {
	m := newLM(t, nil)
	cfg := Config{MaxNewTokens: 12, Temperature: 1, Seed: 7}
	a := generate(t, m, prompt, cfg)
	require.Len(t, a, 12)
	require.Equal(t, a, generate(t, m, prompt, cfg), "same seed, different ids")
	cfg.Seed = 8
	require.NotEqual(t, a, generate(t, m, prompt, cfg), "different seeds gave the same 12 ids")

	greedy := generate(t, m, prompt, Config{MaxNewTokens: 12})
	require.NotEqual(t, greedy, a, "sampling at temperature 1 gave the greedy ids")
	for name, cfg := range map[string]Config{
		"tiny temperature":      {MaxNewTokens: 12, Temperature: 1e-9, Seed: 3},
		"smallest temperature":  {MaxNewTokens: 12, Temperature: math.SmallestNonzeroFloat64, Seed: 3},
		"top-k 1":               {MaxNewTokens: 12, Temperature: 1, TopK: 1, Seed: 3},
		"top-k 1, hot":          {MaxNewTokens: 12, Temperature: 100, TopK: 1, Seed: 4},
		"tiny top-p":            {MaxNewTokens: 12, Temperature: 1, TopP: 1e-9, Seed: 5},
		"greedy ignores top-k":  {MaxNewTokens: 12, TopK: 5, TopP: 0.5, Seed: 6},
		"greedy ignores a seed": {MaxNewTokens: 12, Seed: 99},
	} {
		t.Run(name, func(t *testing.T) {
			require.Equal(t, greedy, generate(t, m, prompt, cfg))
		})
	}
}

func TestStopIDs(t *testing.T) {
	m := newLM(t, nil)
	full := generate(t, m, prompt, Config{MaxNewTokens: 12})
	// The third id is new (not among the first two): stopping on it must end the generation right
	// after it, included.
	require.NotContains(t, full[:2], full[2], "the test needs a prompt whose third greedy id is fresh: %v", full)
	got := generate(t, m, prompt, Config{MaxNewTokens: 12, StopIDs: []int{full[2]}})
	require.Len(t, got, 3)
	require.Equal(t, full[:3], got)

	// Stopping on the first id gives one id; stop ids never generated change nothing.
	require.Equal(t, full[:1], generate(t, m, prompt, Config{MaxNewTokens: 12, StopIDs: []int{63, full[0]}}))
	var unused []int
	for id := range 64 {
		if !slices.Contains(full, id) {
			unused = append(unused, id)
		}
	}
	require.Equal(t, full, generate(t, m, prompt, Config{MaxNewTokens: 12, StopIDs: unused}))

	// Sampling stops too.
	sampled := generate(t, m, prompt, Config{MaxNewTokens: 12, Temperature: 1, Seed: 7})
	stopped := generate(t, m, prompt, Config{MaxNewTokens: 12, Temperature: 1, Seed: 7, StopIDs: []int{sampled[0]}})
	require.Equal(t, sampled[:1], stopped)
}

func TestMethods(t *testing.T) {
	base := newLM(t, nil)
	cfg := Config{MaxNewTokens: 10}
	want := generate(t, base, prompt, cfg)

	t.Run("lora", func(t *testing.T) {
		method, err := lora.New(lora.DefaultConfig())
		require.NoError(t, err)
		m := newLM(t, method)
		require.Equal(t, want, generate(t, m, prompt, cfg), "LoRA with B = 0 differs from the base")

		// A non-zero update: merged and unmerged must agree with each other.
		pefttest.SetRandomB(t, m, 11, 0.5)
		unmerged := generate(t, m, prompt, cfg)
		require.NotEqual(t, want, unmerged, "the LoRA update changed nothing: the comparison proves little")
		require.NoError(t, m.Merge())
		require.Equal(t, unmerged, generate(t, m, prompt, cfg), "merged LoRA generates other ids")
		require.NoError(t, m.Unmerge())
		require.Equal(t, unmerged, generate(t, m, prompt, cfg))
	})

	t.Run("adapter", func(t *testing.T) {
		for _, acfg := range []adapter.Config{adapter.Houlsby(), adapter.Parallel()} {
			method, err := adapter.New(acfg)
			require.NoError(t, err)
			require.Equal(t, want, generate(t, newLM(t, method), prompt, cfg), "%s adapters at init differ from the base", acfg.Placement)
		}
	})

	t.Run("prompt tuning", func(t *testing.T) {
		method, err := prompttuning.New(prompttuning.Config{NumVirtualTokens: 4, Init: prompttuning.InitRandom})
		require.NoError(t, err)
		m := newLM(t, method)
		got := generate(t, m, prompt, cfg)
		require.Len(t, got, cfg.MaxNewTokens)

		// The virtual tokens change the logits of the prompt.
		in := tensors.FromFlatDataAndDimensions([]int32{1, 11, 13, 15}, 1, 4)
		a, err := base.Call(in)
		require.NoError(t, err)
		b, err := m.Call(in)
		require.NoError(t, err)
		require.NotEqual(t, a[0].Value(), b[0].Value())

		// The padding trick holds with virtual tokens too.
		require.Equal(t, pefttest.GreedyReference(t, m, prompt, cfg.MaxNewTokens), got)

		// The model's 64 positions hold 4 virtual tokens and 60 ids: learned from the model, 60
		// ids fit (a 60-long buffer, not 64) and 61 do not.
		long := make([]int, 50)
		for i := range long {
			long[i] = (7 * i) % 64
		}
		require.Len(t, generate(t, m, long, Config{MaxNewTokens: 10}), 10)
		_, err = Generate(m, long, Config{MaxNewTokens: 11})
		require.ErrorContains(t, err, "more than the maximum length 60")
		// An explicit MaxLength is taken as given: the model's own check fails, as an error.
		_, err = Generate(m, long, Config{MaxNewTokens: 10, MaxLength: 64})
		require.ErrorContains(t, err, "num_virtual_tokens 4 plus the input length 64")
	})
}

func TestErrors(t *testing.T) {
	m := newLM(t, nil)
	classifier := pefttest.NewLlama(t, llama.Tiny(), 2, nil, 1, 16)
	ok := Config{MaxNewTokens: 4}
	for _, c := range []struct {
		name   string
		model  *peft.Model
		prompt []int
		cfg    Config
		want   string
	}{
		{"nil model", nil, prompt, ok, "nil model"},
		{"no new tokens", m, prompt, Config{}, "MaxNewTokens must be > 0"},
		{"negative temperature", m, prompt, Config{MaxNewTokens: 4, Temperature: -1}, "Temperature"},
		{"NaN temperature", m, prompt, Config{MaxNewTokens: 4, Temperature: math.NaN()}, "Temperature"},
		{"infinite temperature", m, prompt, Config{MaxNewTokens: 4, Temperature: math.Inf(1)}, "Temperature"},
		{"negative top-k", m, prompt, Config{MaxNewTokens: 4, TopK: -1}, "TopK"},
		{"top-p above 1", m, prompt, Config{MaxNewTokens: 4, TopP: 1.5}, "TopP"},
		{"negative top-p", m, prompt, Config{MaxNewTokens: 4, TopP: -0.1}, "TopP"},
		{"NaN top-p", m, prompt, Config{MaxNewTokens: 4, TopP: math.NaN()}, "TopP"},
		{"negative max length", m, prompt, Config{MaxNewTokens: 4, MaxLength: -1}, "MaxLength"},
		{"negative stop id", m, prompt, Config{MaxNewTokens: 4, StopIDs: []int{-1}}, "StopIDs"},
		{"stop id beyond the vocabulary", m, prompt, Config{MaxNewTokens: 4, StopIDs: []int{64}}, "stop id 64 is outside the vocabulary [0, 64)"},
		{"empty prompt", m, nil, ok, "empty prompt"},
		{"negative id", m, []int{1, -3}, ok, "prompt[1] = -3"},
		{"id beyond the vocabulary", m, []int{1, 64}, ok, "prompt[1] = 64 is outside the vocabulary [0, 64)"},
		{"longer than MaxLength", m, prompt, Config{MaxNewTokens: 5, MaxLength: 8}, "is 9, more than the maximum length 8"},
		{"longer than the model", m, prompt, Config{MaxNewTokens: 61}, "is 65, more than the maximum length 64"},
		{"MaxLength beyond the model's", m, prompt, Config{MaxNewTokens: 61, MaxLength: 100}, "exceeds max_position_embeddings 64"},
		{"not a language model", classifier, prompt, ok, "want logits [batch=1, seq=16, vocab]"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var ids []int
			var err error
			require.NotPanics(t, func() { ids, err = Generate(c.model, c.prompt, c.cfg) })
			require.ErrorContains(t, err, c.want)
			require.Nil(t, ids)
			t.Log(err)
		})
	}
}

func TestValidate(t *testing.T) {
	for _, cfg := range []Config{
		{MaxNewTokens: 1},
		{MaxNewTokens: 1, Temperature: math.SmallestNonzeroFloat64},
		{MaxNewTokens: 1, Temperature: 1e9, TopK: 1000, TopP: 1},
		{MaxNewTokens: 1, Temperature: 0.7, TopP: 1e-12, StopIDs: []int{0, 2}, MaxLength: 1},
	} {
		require.NoError(t, cfg.Validate(), "%+v", cfg)
	}
}

func TestBufferLength(t *testing.T) {
	for _, c := range []struct{ total, limit, want int }{
		{1, 0, 16}, {16, 0, 16}, {17, 0, 32}, {17, 64, 32}, {60, 60, 60}, {49, 60, 60}, {5, 8, 8}, {100, 0, 112},
	} {
		require.Equal(t, c.want, bufferLength(c.total, c.limit), "%+v", c)
	}
}

// The sampling function on its own: its distribution is softmax(logits/T) restricted by top-k and
// top-p, worked out here by hand, and 20,000 draws match it within 2 points (the standard error of
// a frequency is at most 0.35 points here).
func TestSamplingDistribution(t *testing.T) {
	negInf := float32(math.Inf(-1))
	// Ids by logit: 5 (3), 0 (2), 1 (1), 2 and 3 (0.5, a tie), 6 (0), 4 (−1), 7 (never).
	logits := []float32{2, 1, 0.5, 0.5, -1, 3, 0, negInf}
	for _, c := range []struct {
		name              string
		temperature, topP float64
		topK              int
		kept              []int // the ids left after filtering
	}{
		{name: "temperature 1", temperature: 1, kept: []int{0, 1, 2, 3, 4, 5, 6}},
		{name: "temperature 0.5", temperature: 0.5, kept: []int{0, 1, 2, 3, 4, 5, 6}},
		{name: "temperature 3", temperature: 3, kept: []int{0, 1, 2, 3, 4, 5, 6}},
		{name: "top-k 3", temperature: 1, topK: 3, kept: []int{5, 0, 1}},
		// A tie at the edge goes to the lower id: 2 stays, 3 does not.
		{name: "top-k 4 (tie)", temperature: 1, topK: 4, kept: []int{5, 0, 1, 2}},
		{name: "top-k above the vocabulary", temperature: 1, topK: 100, kept: []int{0, 1, 2, 3, 4, 5, 6}},
		// softmax at T=1: 5: .576, 0: .212 (cum .788), 1: .078 (cum .866 ≥ .8).
		{name: "top-p 0.8", temperature: 1, topP: 0.8, kept: []int{5, 0, 1}},
		// 5 alone already has .576 ≥ .5.
		{name: "top-p 0.5", temperature: 1, topP: 0.5, kept: []int{5}},
		{name: "top-p 1 (off)", temperature: 1, topP: 1, kept: []int{0, 1, 2, 3, 4, 5, 6}},
		// Top-k 2 first: 5 and 0 renormalized to .731, .269; top-p .7 keeps 5 alone, .75 both.
		{name: "top-k 2, top-p 0.7", temperature: 1, topK: 2, topP: 0.7, kept: []int{5}},
		{name: "top-k 2, top-p 0.75", temperature: 1, topK: 2, topP: 0.75, kept: []int{5, 0}},
		// At T=2 the probabilities flatten: 5: .344, 0: .209 (cum .553), 1: .127 (.679 ≥ .65),
		// 2: .099 (.778 ≥ .75).
		{name: "T 2, top-p 0.65", temperature: 2, topP: 0.65, kept: []int{5, 0, 1}},
		{name: "T 2, top-p 0.75", temperature: 2, topP: 0.75, kept: []int{5, 0, 1, 2}},
	} {
		t.Run(c.name, func(t *testing.T) {
			want := make([]float64, len(logits))
			total := 0.0
			for _, id := range c.kept {
				want[id] = math.Exp(float64(logits[id]) / c.temperature)
				total += want[id]
			}
			for i := range want {
				want[i] /= total
			}
			s := newSampler(c.temperature, c.topK, c.topP, peft.NewRand(42))
			got := slices.Clone(s.distribution(logits))
			require.InDeltaSlice(t, want, got, 1e-12)

			const draws = 20_000
			counts := make([]int, len(logits))
			for range draws {
				counts[s.sample(logits)]++
			}
			for id := range logits {
				freq := float64(counts[id]) / draws
				if want[id] == 0 {
					require.Zero(t, counts[id], "id %d was filtered out but drawn", id)
				}
				require.InDelta(t, want[id], freq, 0.02, "id %d: frequency %.4f, probability %.4f", id, freq, want[id])
			}
		})
	}
}

func TestSamplerTinyTemperatureAndTies(t *testing.T) {
	negInf := float32(math.Inf(-1))
	logits := []float32{0.1, 0.3, 0.3000001, negInf, 0.3000001}
	require.Equal(t, 2, argmax(logits))
	s := newSampler(1e-12, 0, 0, peft.NewRand(1))
	for range 100 {
		// Ids 2 and 4 tie for the top and share it; nothing else is ever drawn.
		id := s.sample(logits)
		require.Contains(t, []int{2, 4}, id)
	}
	s = newSampler(1e-12, 1, 0, peft.NewRand(1))
	for range 100 {
		require.Equal(t, 2, s.sample(logits), "top-k 1 keeps the lower of tied ids")
	}
	require.NoError(t, checkLogits(logits))
	require.Error(t, checkLogits([]float32{0, float32(math.NaN())}))
	require.Error(t, checkLogits([]float32{0, float32(math.Inf(1))}))
	require.Error(t, checkLogits([]float32{negInf, negInf}))
}

// OnToken sees every new id in order as it is chosen, and returning false stops there.
func TestOnToken(t *testing.T) {
	m := newLM(t, nil)
	want := generate(t, m, prompt, Config{MaxNewTokens: 8})
	var seen []int
	got := generate(t, m, prompt, Config{MaxNewTokens: 8, OnToken: func(id int) bool { seen = append(seen, id); return true }})
	require.Equal(t, want, got)
	require.Equal(t, want, seen)
	seen = nil
	got = generate(t, m, prompt, Config{MaxNewTokens: 8, OnToken: func(id int) bool { seen = append(seen, id); return len(seen) < 3 }})
	require.Equal(t, want[:3], got)
	require.Equal(t, want[:3], seen)
}
