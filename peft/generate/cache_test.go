package generate

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/adapter"
	"peft/ia3"
	"peft/lora"
	"peft/lora/adalora"
	"peft/peft"
	"peft/peft/llama"
	"peft/peft/pefttest"
	"peft/prefixtuning"
	"peft/prompttuning"
	"peft/qlora"
)

// cacheMethod names a method the cached path is checked with, and builds it.
type cacheMethod struct {
	name string
	new  func(t testing.TB) peft.Method
}

// cacheMethods are the methods checked with the cache: the base model, those acting per token
// and the two that add positions, with small prompts and prefixes.
var cacheMethods = []cacheMethod{
	{"base", func(testing.TB) peft.Method { return nil }},
	{"lora", func(t testing.TB) peft.Method { return must(t)(lora.New(lora.DefaultConfig())) }},
	{"dora", func(t testing.TB) peft.Method {
		c := lora.DefaultConfig()
		c.UseDoRA, c.TargetModules = true, peft.TargetPattern(peft.AllLinear)
		return must(t)(lora.New(c))
	}},
	{"ia3", func(t testing.TB) peft.Method { return must(t)(ia3.New(ia3.DefaultConfig())) }},
	{"adapter", func(t testing.TB) peft.Method { return must(t)(adapter.New(adapter.Houlsby())) }},
	{"adalora", func(t testing.TB) peft.Method {
		c := adalora.DefaultConfig()
		c.TotalSteps, c.TargetModules = 10, peft.TargetPattern(peft.AllLinear)
		return must(t)(adalora.New(c))
	}},
	{"qlora", func(t testing.TB) peft.Method {
		c := qlora.DefaultConfig()
		c.BlockSize = 32
		return must(t)(qlora.New(c))
	}},
	{"prompt_tuning", func(t testing.TB) peft.Method {
		c := prompttuning.DefaultConfig()
		c.NumVirtualTokens = 4
		return must(t)(prompttuning.New(c))
	}},
	{"prefix_tuning", func(t testing.TB) peft.Method {
		c := prefixtuning.DefaultConfig()
		c.NumVirtualTokens = 3
		return must(t)(prefixtuning.New(c))
	}},
}

func must(t testing.TB) func(peft.Method, error) peft.Method {
	return func(m peft.Method, err error) peft.Method {
		t.Helper()
		require.NoError(t, err)
		return m
	}
}

// perturb moves every variable the method trains by N(0, 0.3²), so that no method is at its
// identity (LoRA's B = 0, IA³'s ones, an adapter's zero up-projection) and the check sees its
// update.
func perturb(t testing.TB, m *peft.Model) {
	t.Helper()
	rng := peft.NewRand(7)
	for _, tv := range m.TrainableVariables() {
		values, err := peft.Float32s(tv.Variable)
		require.NoError(t, err)
		for i, noise := range peft.Normal(rng, len(values), 0.3) {
			values[i] += noise
		}
		require.NoError(t, peft.SetFloat32s(tv.Variable, values))
	}
}

// mistralTiny is the tiny model in the Mistral family with a sliding window of 3, shorter than
// the sequences checked, so that the window drops cached positions.
func mistralTiny() llama.Config {
	cfg := llama.Tiny()
	cfg.ModelType, cfg.SlidingWindow = llama.FamilyMistral, 3
	return cfg
}

// forEachFamilyAndMethod runs check as a subtest on the tiny Llama (grouped-query: 4 heads, 2 kv
// heads) and the tiny Mistral, each with every method of cacheMethods, perturbed, traced with
// [batch, seq] ids.
func forEachFamilyAndMethod(t *testing.T, batch, seq int, check func(*testing.T, llama.Config, *peft.Model)) {
	for _, family := range []struct {
		name string
		cfg  llama.Config
	}{{"llama_gqa", llama.Tiny()}, {"mistral_window3", mistralTiny()}} {
		for _, method := range cacheMethods {
			t.Run(family.name+"/"+method.name, func(t *testing.T) {
				m := pefttest.NewLlama(t, family.cfg, 0, method.new(t), batch, seq)
				perturb(t, m)
				check(t, family.cfg, m)
			})
		}
	}
}

// checkCachedLogits runs the sequences seqs ([batch][T] ids) through the cached decoder: the
// first n ids as a prefill padded to prefill ids with room for room, then a chunk of two ids,
// then one id per step. Every logit must equal the full forward's on the whole sequences
// (causal, so position t's are those of the sequence up to t) within 1e-5 times the largest
// |logit| where that is over 1: float32 sums in another order differ by about that much (on
// stories260K, whose logits reach 18.9, the cache-free path's padded buffer differs from the
// unpadded forward by 1.5e-5). It returns the largest difference.
func checkCachedLogits(t *testing.T, m *peft.Model, cfg llama.Config, seqs [][]int32, n, prefill, room int) float64 {
	t.Helper()
	full := pefttest.Call(t, m, seqs, nil).Value().([][][]float32)
	batch, total := len(seqs), len(seqs[0])
	worst, scale := 0.0, 1.0
	for _, row := range full {
		for _, logits := range row {
			for _, v := range logits {
				scale = math.Max(scale, math.Abs(float64(v)))
			}
		}
	}
	compare := func(out *tensors.Tensor, from, count int) {
		got := out.Value().([][][]float32)
		require.Len(t, got, batch)
		for b := range batch {
			for i := range count {
				for v, want := range full[b][from+i] {
					worst = math.Max(worst, math.Abs(float64(got[b][i][v]-want)))
				}
			}
		}
	}
	ids := make([][]int32, batch)
	for b := range batch {
		ids[b] = make([]int32, prefill)
		copy(ids[b], seqs[b][:n])
	}
	out, err := m.CallFn(fmt.Sprintf("test.prefill/%d", room), llama.CausalLMPrefill(cfg, room), tensors.FromValue(ids))
	require.NoError(t, err)
	require.Len(t, out, 3)
	compare(out[0], 0, n)
	keys, values := out[1], out[2]
	added := 0
	if p, ok := m.Method().(*prompttuning.PromptTuning); ok {
		added = p.NumVirtualTokens()
	}
	require.Equal(t, []int{cfg.NumLayers, batch, room + added, cfg.NumKVHeads, cfg.HeadDim()}, keys.Shape().Dimensions)
	for start := n; start < total; {
		size := 1
		if start == n {
			size = 2 // a chunk: several new ids in one step
		}
		step := make([][]int32, batch)
		for b := range batch {
			step[b] = seqs[b][start : start+size]
		}
		out, err = m.CallFn("test.step", llama.CausalLMStep(cfg), tensors.FromValue(step), tensors.FromScalar(int32(start)), keys, values)
		require.NoError(t, err)
		compare(out[0], start, size)
		keys, values = out[1], out[2]
		start += size
	}
	require.LessOrEqual(t, worst, 1e-5*scale, "largest |logit| %.3g", scale)
	return worst
}

// Cached decoding's logits equal the full forward's at every step, within 1e-5, for every
// method on the tiny Llama (grouped-query: 4 heads, 2 kv heads) and on the tiny Mistral (sliding
// window), on a batch of two sequences.
func TestCachedLogitsMatchFullForward(t *testing.T) {
	seqs := [][]int32{{1, 11, 13, 15, 2, 40, 7, 9, 33, 21}, {1, 5, 63, 8, 0, 12, 19, 44, 3, 6}}
	forEachFamilyAndMethod(t, 2, 10, func(t *testing.T, cfg llama.Config, m *peft.Model) {
		// A prompt of 5 in a prefill of 8, room for 12 (2 unused).
		t.Logf("max |cached − full| %.3g", checkCachedLogits(t, m, cfg, seqs, 5, 8, 12))
	})
}

// The same on every family checkpoint of peft/llama's tests (Llama 3 rope scaling, biases,
// Mistral's window, Qwen2, Qwen3's q/k norms) and on stories260K, as loaded from their folders.
func TestCachedLogitsOnFamilyCheckpoints(t *testing.T) {
	dirs, err := filepath.Glob("../llama/testdata/families/*")
	require.NoError(t, err)
	require.Len(t, dirs, 5)
	for _, dir := range dirs {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			cfg, m := pefttest.FolderModel(t, os.DirFS(dir), nil, 1)
			_, ok := cachedConfig(m)
			require.True(t, ok, "Generate must find the cache for a model loaded from a folder")
			seqs := [][]int32{{1, 4, 9, 16, 25, 36, 49, 2, 8}}
			t.Logf("max |cached − full| %.3g", checkCachedLogits(t, m, cfg, seqs, 3, 3, 9))
		})
	}
	t.Run("stories260K", func(t *testing.T) {
		cfg, m := pefttest.StoriesModel(t, nil)
		seqs := [][]int32{{1, 403, 407, 261, 378, 410, 425, 402, 260, 270, 290, 300}}
		t.Logf("max |cached − full| %.3g", checkCachedLogits(t, m, cfg, seqs, 4, 16, 16))
	})
}

// Generation with the cache gives the ids of the cache-free path and of the slow reference, id
// for id, greedy (with and without a stop id) and sampled with a seed, for every method on the
// tiny Llama and Mistral.
func TestCachedGenerateMatchesCacheFree(t *testing.T) {
	const steps = 14 // 4 + 14 ids: a buffer of 32, a prefill of 16
	forEachFamilyAndMethod(t, 1, 16, func(t *testing.T, _ llama.Config, m *peft.Model) {
		_, ok := cachedConfig(m)
		require.True(t, ok, "the cache must be used")
		want := pefttest.GreedyReference(t, m, prompt, steps)
		require.Equal(t, want, generate(t, m, prompt, Config{MaxNewTokens: steps}))
		require.Equal(t, want, generate(t, m, prompt, Config{MaxNewTokens: steps, NoCache: true}))
		stop := Config{MaxNewTokens: steps, StopIDs: []int{want[5]}}
		require.Equal(t, generate(t, m, prompt, Config{MaxNewTokens: steps, StopIDs: stop.StopIDs, NoCache: true}),
			generate(t, m, prompt, stop))
		sample := Config{MaxNewTokens: steps, Temperature: 1.5, TopK: 40, Seed: 3}
		sampled := generate(t, m, prompt, sample)
		sample.NoCache = true
		require.Equal(t, generate(t, m, prompt, sample), sampled)
	})
}

// On stories260K, base and with a perturbed LoRA, 28 greedy ids with the cache are those without
// it and those of the slow reference.
func TestCachedGenerateStories260K(t *testing.T) {
	for _, method := range cacheMethods[:2] {
		t.Run(method.name, func(t *testing.T) {
			_, m := pefttest.StoriesModel(t, method.new(t))
			perturb(t, m)
			start := []int{1, 403, 407}
			want := pefttest.GreedyReference(t, m, start, 28)
			require.Equal(t, want, generate(t, m, start, Config{MaxNewTokens: 28}))
			require.Equal(t, want, generate(t, m, start, Config{MaxNewTokens: 28, NoCache: true}))
		})
	}
}

// notAware is prompt tuning seen through the hook interfaces only: a method that changes the
// inputs without saying it honours peft.Inputs.Cached.
type notAware struct {
	peft.Method
	peft.InputsHook
}

// Generate runs the cache-free path for what cannot take the cache: a method with an inputs hook
// that is not CacheAware (and still generates the reference's ids), a classifier, a model with
// no base model record.
func TestCacheFallback(t *testing.T) {
	c := prompttuning.DefaultConfig()
	c.NumVirtualTokens = 4
	p, err := prompttuning.New(c)
	require.NoError(t, err)
	m := newLM(t, notAware{p, p})
	_, ok := cachedConfig(m)
	require.False(t, ok)
	require.Equal(t, pefttest.GreedyReference(t, m, prompt, 6), generate(t, m, prompt, Config{MaxNewTokens: 6}))

	_, ok = cachedConfig(pefttest.NewLlama(t, llama.Tiny(), 2, nil, 1, 4))
	require.False(t, ok, "a classifier")

	unrecorded := newLM(t, nil)
	peft.SetBaseModel(unrecorded.Context(), peft.BaseModel{})
	_, ok = cachedConfig(unrecorded)
	require.False(t, ok, "no record of the base model")
}
