package generate

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft"
	"peft/peft/llama"
	"peft/peft/pefttest"
)

// batchMethods are the methods GenerateBatch is checked with: the base model, LoRA and the two
// that add positions before each row's real tokens.
var batchMethods = []string{"base", "lora", "prompt_tuning", "prefix_tuning"}

// methodNamed returns the cacheMethods entry of name.
func methodNamed(t *testing.T, name string) cacheMethod {
	for _, c := range cacheMethods {
		if c.name == name {
			return c
		}
	}
	t.Fatalf("no method %q", name)
	return cacheMethod{}
}

// checkBatchMatchesAlone runs prompts (of lengths 1, 4, 9 and 6) in one GenerateBatch, each row
// with its own configuration: greedy to MaxNewTokens 12; sampled (temperature 1.3, top-k 20,
// seed 5) to 7; greedy with a stop id (the 4th id it makes alone) out of 10; sampled (0.9, top-p
// 0.9, seed 11) ended by OnToken after 5 of 15. Each row's ids, and those its OnToken saw, must
// be those of Generate on that prompt alone, and the rows must end at different lengths.
func checkBatchMatchesAlone(t *testing.T, m *peft.Model, prompts [][]int) {
	t.Helper()
	_, ok := cachedConfig(m)
	require.True(t, ok, "the cache must be used")
	stopAt := generate(t, m, prompts[2], Config{MaxNewTokens: 10})[3]
	cfgs := func(seen [][]int) []Config {
		record := func(row, limit int) func(int) bool {
			return func(id int) bool { seen[row] = append(seen[row], id); return limit == 0 || len(seen[row]) < limit }
		}
		return []Config{
			{MaxNewTokens: 12, OnToken: record(0, 0)},
			{MaxNewTokens: 7, Temperature: 1.3, TopK: 20, Seed: 5, OnToken: record(1, 0)},
			{MaxNewTokens: 10, StopIDs: []int{stopAt}, OnToken: record(2, 0)},
			{MaxNewTokens: 15, Temperature: 0.9, TopP: 0.9, Seed: 11, OnToken: record(3, 5)},
		}
	}
	aloneSeen, batchSeen := make([][]int, len(prompts)), make([][]int, len(prompts))
	want := make([][]int, len(prompts))
	for i, c := range cfgs(aloneSeen) {
		want[i] = generate(t, m, prompts[i], c)
	}
	got, err := GenerateBatch(m, prompts, cfgs(batchSeen))
	require.NoError(t, err)
	require.Equal(t, want, got)
	require.Equal(t, aloneSeen, batchSeen)
	require.Equal(t, want, batchSeen, "OnToken sees every id, a stop id too")
	require.Len(t, got[0], 12)
	require.Len(t, got[1], 7)
	require.LessOrEqual(t, len(got[2]), 4)
	require.Equal(t, stopAt, got[2][len(got[2])-1])
	require.Len(t, got[3], 5)
	t.Logf("rows of %d, %d, %d, %d ids", len(got[0]), len(got[1]), len(got[2]), len(got[3]))
}

// GenerateBatch gives, row by row, the ids of Generate on each prompt alone, greedy and sampled,
// each row with its own MaxNewTokens, stop ids and OnToken, for the base model, LoRA, prompt
// tuning and prefix tuning (perturbed) on the tiny Llama (grouped-query: 4 heads, 2 kv heads)
// and the tiny Mistral (sliding window 3, shorter than the prompts).
func TestGenerateBatchMatchesAlone(t *testing.T) {
	prompts := [][]int{{1}, {1, 11, 13, 15}, {1, 5, 63, 8, 12, 19, 44, 3, 6}, {1, 40, 7, 9, 33, 21}}
	for _, family := range []struct {
		name string
		cfg  llama.Config
	}{{"llama_gqa", llama.Tiny()}, {"mistral_window3", mistralTiny()}} {
		for _, name := range batchMethods {
			t.Run(family.name+"/"+name, func(t *testing.T) {
				m := pefttest.NewLlama(t, family.cfg, 0, methodNamed(t, name).new(t), 1, 16)
				perturb(t, m)
				checkBatchMatchesAlone(t, m, prompts)
			})
		}
	}
}

// The same on stories260K (vocabulary 512, 5 layers, 8 heads over 4 kv heads).
func TestGenerateBatchStories260K(t *testing.T) {
	prompts := [][]int{{1}, {1, 403, 407, 261}, {1, 378, 410, 425, 402, 260, 270, 290, 300}, {1, 403, 261, 378, 270, 407}}
	for _, name := range batchMethods {
		t.Run(name, func(t *testing.T) {
			_, m := pefttest.StoriesModel(t, methodNamed(t, name).new(t))
			perturb(t, m)
			checkBatchMatchesAlone(t, m, prompts)
		})
	}
}

// A row that fails ends alone: the others still give their ids alone, and the error is a
// *BatchError naming the row. Rows with NoCache, and every row of a model without the cache, run
// one after another and give the same ids. A nil model and a count mismatch are plain errors.
func TestGenerateBatchErrorsAndFallback(t *testing.T) {
	m := newLM(t, nil)
	prompts := [][]int{{1, 11, 13, 15}, {}, {1, 99}, {1, 5}}
	cfgs := []Config{{MaxNewTokens: 6}, {MaxNewTokens: 3}, {MaxNewTokens: 3}, {MaxNewTokens: 4, NoCache: true}}
	got, err := GenerateBatch(m, prompts, cfgs)
	var be *BatchError
	require.ErrorAs(t, err, &be)
	require.Len(t, be.Rows, 4)
	require.NoError(t, be.Rows[0])
	require.ErrorContains(t, be.Rows[1], "empty prompt")
	require.ErrorContains(t, be.Rows[2], "prompt[1] = 99 is outside the vocabulary [0, 64)")
	require.NoError(t, be.Rows[3])
	require.ErrorContains(t, err, "generate: 2 of 4 rows failed: row 1: generate: empty prompt")
	require.Equal(t, generate(t, m, prompts[0], cfgs[0]), got[0])
	require.Nil(t, got[1])
	require.Nil(t, got[2])
	require.Equal(t, generate(t, m, prompts[3], cfgs[3]), got[3])
	require.True(t, errors.Is(err, be.Rows[1]))

	unrecorded := newLM(t, nil)
	peft.SetBaseModel(unrecorded.Context(), peft.BaseModel{})
	got, err = GenerateBatch(unrecorded, prompts[:1], cfgs[:1])
	require.NoError(t, err)
	require.Equal(t, generate(t, m, prompts[0], cfgs[0]), got[0])

	_, err = GenerateBatch(nil, prompts, cfgs)
	require.ErrorContains(t, err, "nil model")
	_, err = GenerateBatch(m, prompts, cfgs[:2])
	require.ErrorContains(t, err, "4 prompts and 2 configurations")
	got, err = GenerateBatch(m, nil, nil)
	require.NoError(t, err)
	require.Empty(t, got)
}
