package data_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"peft/peft/data"
)

// FuzzJSONL: any file either is refused with an error naming a line, or gives records that
// tokenize into examples no longer than the row, with loss flags for each token and the first
// never a target. Seeds: the example dataset's first lines and one record of each form.
func FuzzJSONL(f *testing.F) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "examples", "train", "testdata", "valid.jsonl"))
	require.NoError(f, err)
	f.Add(strings.Join(strings.SplitN(string(raw), "\n", 4)[:3], "\n"))
	f.Add(`{"text": "Once upon a time"}`)
	f.Add(`{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}`)
	tok := storiesTokenizer(f)
	f.Fuzz(func(t *testing.T, jsonl string) {
		file, err := data.ParseJSONL("f.jsonl", strings.NewReader(jsonl))
		if err != nil {
			require.Contains(t, err.Error(), "f.jsonl")
			return
		}
		if file.Format == data.Chat {
			return // needs a template; the chat package fuzzes the spans
		}
		examples, _, err := data.Tokenize(file, tok, data.Options{SeqLen: 16, EOS: tok.EOS()})
		if err != nil {
			require.Contains(t, err.Error(), "f.jsonl")
			return
		}
		for _, ex := range examples {
			require.LessOrEqual(t, len(ex.IDs), 16)
			require.Len(t, ex.Loss, len(ex.IDs))
			require.False(t, ex.Loss[0])
		}
	})
}
