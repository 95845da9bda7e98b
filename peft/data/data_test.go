package data_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/gomlx/gomlx/pkg/core/tensors"
	"github.com/stretchr/testify/require"

	"peft/peft/chat"
	"peft/peft/data"
	"peft/peft/tokenizer"
)

func storiesTokenizer(t testing.TB) *tokenizer.Tokenizer {
	t.Helper()
	tok, err := tokenizer.Load(filepath.Join("..", "stories260k", "testdata", "stories260K"))
	require.NoError(t, err)
	return tok
}

func parse(t *testing.T, jsonl string) *data.File {
	t.Helper()
	f, err := data.ParseJSONL("train.jsonl", strings.NewReader(jsonl))
	require.NoError(t, err)
	return f
}

func ints(ids []int) []int32 {
	out := make([]int32, len(ids))
	for i, id := range ids {
		out[i] = int32(id)
	}
	return out
}

// Each form, token by token: the ids are the tokenizer's, and the loss covers exactly what the
// model should learn to write.
func TestFormsAndLossMasks(t *testing.T) {
	tok := storiesTokenizer(t)
	eos := tok.EOS()

	t.Run("text", func(t *testing.T) {
		ex, stats, err := data.Tokenize(parse(t, "\xef\xbb\xbf"+`{"text": "Once upon a time", "id": 7}`+"\n\n"), tok, data.Options{SeqLen: 64, EOS: eos})
		require.NoError(t, err)
		want := append(tok.Encode("Once upon a time"), eos)
		require.Equal(t, ints(want), ex[0].IDs)
		require.Equal(t, append([]bool{false}, slices.Repeat([]bool{true}, len(want)-1)...), ex[0].Loss)
		require.Equal(t, 1, ex[0].Line)
		require.Equal(t, data.Stats{Records: 1, Examples: 1, Tokens: len(want), LossTokens: len(want) - 1}, stats)
	})

	t.Run("prompt/completion", func(t *testing.T) {
		ex, _, err := data.Tokenize(parse(t, `{"prompt": "Once upon a time", "completion": " there was a girl"}`), tok, data.Options{SeqLen: 64, EOS: eos})
		require.NoError(t, err)
		prompt := tok.Encode("Once upon a time")
		whole := append(tok.Encode("Once upon a time there was a girl"), eos)
		require.Equal(t, prompt, whole[:len(prompt)])
		require.Equal(t, ints(whole), ex[0].IDs)
		require.Equal(t, append(slices.Repeat([]bool{false}, len(prompt)), slices.Repeat([]bool{true}, len(whole)-len(prompt))...), ex[0].Loss)
		require.Equal(t, "there was a girl", tok.Decode(whole[len(prompt):], true))

		// A prompt whose last token merges with the completion's first: the merged token is learnt.
		ex, stats, err := data.Tokenize(parse(t, `{"prompt": "Once upon a ti", "completion": "me there was"}`), tok, data.Options{SeqLen: 64, EOS: eos})
		require.NoError(t, err)
		require.Equal(t, 1, stats.Merged)
		require.Contains(t, stats.String(), "1 prompts whose last token merges into the completion")
		learnt := []int{}
		for i, l := range ex[0].Loss {
			if l {
				learnt = append(learnt, int(ex[0].IDs[i]))
			}
		}
		require.Equal(t, "time there was", tok.Decode(learnt, true))
	})

	t.Run("chat", func(t *testing.T) {
		qwen, err := tokenizer.Load(filepath.Join("..", "tokenizer", "testdata", "bytelevel", "qwen2.json"))
		require.NoError(t, err)
		src, err := os.ReadFile(filepath.Join("..", "chat", "testdata", "templates", "qwen2.5.jinja"))
		require.NoError(t, err)
		tmpl, err := chat.Parse(string(src), map[string]string{"eos_token": "<|im_end|>"})
		require.NoError(t, err)
		f := parse(t, `{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6, as 3+3 is 6."}]}`)
		ex, stats, err := data.Tokenize(f, qwen, data.Options{SeqLen: 256, EOS: -1, Template: tmpl})
		require.NoError(t, err)
		text, err := tmpl.Render(f.Records[0].Messages, chat.Options{})
		require.NoError(t, err)
		require.Equal(t, ints(qwen.EncodeNoSpecial(text)), ex[0].IDs)
		var learnt []string // the runs of tokens in the loss, decoded
		for i := 0; i < len(ex[0].IDs); i++ {
			if !ex[0].Loss[i] {
				continue
			}
			j := i
			var ids []int
			for ; j < len(ex[0].IDs) && ex[0].Loss[j]; j++ {
				ids = append(ids, int(ex[0].IDs[j]))
			}
			learnt = append(learnt, qwen.Decode(ids, false))
			i = j
		}
		require.Equal(t, []string{"4<|im_end|>", "6, as 3+3 is 6.<|im_end|>"}, learnt)
		require.Equal(t, stats.LossTokens, len(qwen.EncodeNoSpecial("4<|im_end|>"))+len(qwen.EncodeNoSpecial("6, as 3+3 is 6.<|im_end|>")))

		_, _, err = data.Tokenize(f, qwen, data.Options{SeqLen: 256, EOS: -1})
		require.ErrorContains(t, err, "train.jsonl holds chat records and the model has no chat template")

		// Qwen3's template writes the last assistant turn with a <think> block and earlier ones
		// without: the conversation becomes one example per assistant turn, each learning its
		// own turn as Qwen3 writes the newest.
		src3, err := os.ReadFile(filepath.Join("..", "chat", "testdata", "templates", "qwen3.jinja"))
		require.NoError(t, err)
		qwen3, err := chat.Parse(string(src3), map[string]string{"eos_token": "<|im_end|>"})
		require.NoError(t, err)
		ex, stats, err = data.Tokenize(f, qwen, data.Options{SeqLen: 256, EOS: -1, Template: qwen3})
		require.NoError(t, err)
		require.Equal(t, 1, stats.TurnSplit)
		require.Len(t, ex, 2)
		var perTurn []string
		for _, e := range ex {
			var ids []int
			for i, l := range e.Loss {
				if l {
					ids = append(ids, int(e.IDs[i]))
				}
			}
			perTurn = append(perTurn, qwen.Decode(ids, false))
		}
		require.Equal(t, []string{"<think>\n\n</think>\n\n4<|im_end|>", "<think>\n\n</think>\n\n6, as 3+3 is 6.<|im_end|>"}, perTurn)
		require.Contains(t, stats.String(), "1 conversations made into one example per assistant turn")
	})
}

// Rows of SeqLen: a long text is split into windows that lose nothing, a long prompt/completion
// is truncated and counted, and one whose prompt fills the row is an error naming its line.
func TestSeqLen(t *testing.T) {
	tok := storiesTokenizer(t)
	long := strings.Repeat("Tom and Lily played in the park. ", 6)
	ids := append(tok.Encode(long), tok.EOS())
	seq := 16
	ex, stats, err := data.Tokenize(parse(t, fmt.Sprintf(`{"text": %q}`, long)), tok, data.Options{SeqLen: seq, EOS: tok.EOS()})
	require.NoError(t, err)
	require.Equal(t, 1, stats.Split)
	var joined []int32
	for i, e := range ex {
		require.LessOrEqual(t, len(e.IDs), seq)
		if i > 0 && len(e.IDs) == 2 && e.Loss[1] { // a last token alone keeps the one before as context
			joined = append(joined, e.IDs[1])
			continue
		}
		joined = append(joined, e.IDs...)
	}
	require.Equal(t, ints(ids), joined)

	two := `{"prompt": "Once", "completion": "` + long + `"}` + "\n" + `{"prompt": "` + long + `", "completion": " The end."}`
	_, _, err = data.Tokenize(parse(t, two), tok, data.Options{SeqLen: seq, EOS: tok.EOS()})
	require.EqualError(t, err, "data: train.jsonl:2: no token left to learn within the row length 16 (the prompt fills it): raise the sequence length or shorten the prompt")
	ex, stats, err = data.Tokenize(parse(t, strings.SplitN(two, "\n", 2)[0]), tok, data.Options{SeqLen: seq, EOS: tok.EOS()})
	require.NoError(t, err)
	require.Equal(t, 1, stats.Truncated)
	require.Equal(t, 1, stats.FirstTruncated)
	require.Len(t, ex[0].IDs, seq)
	require.Contains(t, stats.String(), "1 examples truncated at the row length (first: line 1)")
}

// Every kind of bad line is an error naming the file and the line.
func TestMalformedLines(t *testing.T) {
	for _, tc := range []struct{ name, jsonl, want string }{
		{"not JSON", `{"text": "a"}` + "\n" + `{"text": "b"`, "train.jsonl:2: not a JSON object"},
		{"not an object", `["text", "a"]`, "train.jsonl:1: not a JSON object but a JSON array"},
		{"null completion", `{"prompt": "a", "completion": null}`, `train.jsonl:1: field "completion" is null, not a string`},
		{"no known field", `{"content": "a"}`, `train.jsonl:1: no "text", "prompt"/"completion" or "messages" field`},
		{"two forms", `{"text": "a", "prompt": "b", "completion": "c"}`, "train.jsonl:1: fields of more than one form"},
		{"prompt alone", `{"prompt": "a"}`, `train.jsonl:1: a prompt/completion record without "completion"`},
		{"completion alone", `{"completion": "a"}`, `train.jsonl:1: a prompt/completion record without "prompt"`},
		{"text not a string", `{"text": 3}`, `train.jsonl:1: field "text" is not a string`},
		{"empty text", `{"text": "  "}`, `train.jsonl:1: field "text" is empty`},
		{"empty completion", `{"prompt": "a", "completion": ""}`, `train.jsonl:1: field "completion" is empty`},
		{"messages not a list", `{"messages": "hi"}`, `train.jsonl:1: field "messages" is not a list of objects`},
		{"no messages", `{"messages": []}`, `train.jsonl:1: field "messages" is empty`},
		{"message without role", `{"messages": [{"content": "hi"}]}`, `train.jsonl:1: message 0: no field "role"`},
		{"content not a string", `{"messages": [{"role": "user", "content": ["hi"]}]}`, `train.jsonl:1: message 0: field "content" is not a string`},
		{"no assistant turn", `{"messages": [{"role": "user", "content": "hi"}]}`, "train.jsonl:1: no assistant message: nothing to learn"},
		{"mixed forms", `{"text": "a"}` + "\n\n" + `{"prompt": "b", "completion": "c"}`, "train.jsonl:3: a prompt_completion record in a file of text records (line 1)"},
		{"empty file", "\n  \n", "train.jsonl has no records"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := data.ParseJSONL("train.jsonl", strings.NewReader(tc.jsonl))
			require.ErrorContains(t, err, tc.want)
		})
	}
}

// Batches: batch i is a function of the seed and i alone; each epoch holds every example once;
// packing fills rows without crossing the loss from one example into the next; Pass covers
// every row once.
func TestLoader(t *testing.T) {
	tok := storiesTokenizer(t)
	var lines []string
	for i := range 10 {
		lines = append(lines, fmt.Sprintf(`{"prompt": "Story %d:", "completion": "%s"}`, i, strings.Repeat(" Tom ran.", i%3+1)))
	}
	examples, _, err := data.Tokenize(parse(t, strings.Join(lines, "\n")), tok, data.Options{SeqLen: 24, EOS: tok.EOS()})
	require.NoError(t, err)

	newLoader := func(pack bool) *data.Loader {
		return &data.Loader{Examples: examples, Batch: 3, SeqLen: 24, Shuffle: true, Seed: 9, Pack: pack}
	}
	a, b := newLoader(false), newLoader(false)
	require.NoError(t, a.Validate())
	for _, i := range []int{5, 0, 3, 9} { // any order of access
		require.Equal(t, flat(a.BatchAt(i).Inputs[0]), flat(b.BatchAt(i).Inputs[0]))
	}
	// Rows 0…9 are one epoch: each example once, then padding that is never learnt.
	seen := map[int]bool{}
	for row := range 10 {
		batch := a.BatchAt(row / 3)
		r := row % 3
		ids := flat(batch.Labels[0])[r*24 : (r+1)*24]
		mask := flat(batch.Labels[1])[r*24 : (r+1)*24]
		loss := flat(batch.Labels[2])[r*24 : (r+1)*24]
		for k, e := range examples {
			if slices.Equal(ids[:len(e.IDs)], e.IDs) && (len(e.IDs) == 24 || mask[len(e.IDs)] == 0) {
				seen[k] = true
				for p := range 24 {
					require.Equal(t, p < len(e.IDs) && e.Loss[p], loss[p] == 1, "row %d position %d", row, p)
				}
			}
		}
	}
	require.Len(t, seen, 10)
	require.NotEqual(t, flat(a.BatchAt(0).Inputs[0]), flat(newLoader(false).BatchAt(4).Inputs[0]), "the next epoch has another order")

	packed := newLoader(true)
	packed.SeqLen = 64
	require.NoError(t, packed.Validate())
	require.Less(t, packed.RowsPerEpoch(), 6)
	batch := packed.BatchAt(0)
	ids, mask, loss := flat(batch.Labels[0]), flat(batch.Labels[1]), flat(batch.Labels[2])
	for k := range ids {
		if ids[k] == int32(tok.BOS()) && mask[k] == 1 {
			require.Zero(t, loss[k], "the first token of a packed example is not learnt from the one before it")
		}
	}
	total := 0
	for _, p := range packed.Pass() {
		for _, m := range flat(p.Labels[1]) {
			total += int(m)
		}
	}
	tokens := 0
	for _, e := range examples {
		tokens += len(e.IDs)
	}
	require.Equal(t, tokens, total, "Pass holds every token once")

	bad := &data.Loader{Examples: examples, Batch: 2, SeqLen: 8}
	require.ErrorContains(t, bad.Validate(), "ids and")
}

func flat(t *tensors.Tensor) []int32 { return tensors.MustCopyFlatData[int32](t) }
