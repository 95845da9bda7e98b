package chat_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
	"golang.org/x/text/unicode/norm"

	"peft/peft/chat"
	"peft/peft/tokenizer"
)

// Any user and assistant text: the assistant span is the text Qwen2.5's template writes followed
// by <|im_end|>, and its tokens, when its boundaries fall between tokens, decode to exactly it
// (in NFC, as Qwen2's tokenizer normalizes text first).
func FuzzAssistantSpans(f *testing.F) {
	for _, seed := range [][2]string{{"2+2?", "4"}, {"Café 東京 🙂", "  spaced\n\n"}, {"", ""}, {"a\r\nb", "123 4567"}} {
		f.Add(seed[0], seed[1])
	}
	src, err := os.ReadFile("testdata/templates/qwen2.5.jinja")
	require.NoError(f, err)
	tmpl, err := chat.Parse(string(src), map[string]string{"eos_token": "<|im_end|>"})
	require.NoError(f, err)
	tok, err := tokenizer.Load(filepath.Join("..", "tokenizer", "testdata", "bytelevel", "qwen2.json"))
	require.NoError(f, err)
	f.Fuzz(func(t *testing.T, user, assistant string) {
		if !utf8.ValidString(user) || !utf8.ValidString(assistant) || strings.Contains(user+assistant, "<|") {
			t.Skip("special tokens and invalid UTF-8 are the tokenizer's matter")
		}
		r, err := tmpl.RenderSpans([]chat.Message{{Role: "user", Content: user}, {Role: "assistant", Content: assistant}}, chat.Options{})
		require.NoError(t, err)
		require.Len(t, r.Assistant, 1)
		s := r.Assistant[0]
		require.Equal(t, assistant+"<|im_end|>", r.Text[s.Start:s.End])
		toks, err := r.Encode(tok)
		if err != nil {
			require.ErrorContains(t, err, "falls inside a token")
			return
		}
		ts := toks.Assistant[0]
		require.Equal(t, norm.NFC.String(assistant)+"<|im_end|>", tok.Decode(toks.IDs[ts.Start:ts.End], false))
	})
}

// FuzzTemplate: any template source either fails to compile or to render with an error, or
// renders; the engine never takes the program down. Seeds: the real templates.
func FuzzTemplate(f *testing.F) {
	paths, err := filepath.Glob(filepath.Join("testdata", "templates", "*.jinja"))
	require.NoError(f, err)
	for _, p := range paths {
		src, err := os.ReadFile(p)
		require.NoError(f, err)
		f.Add(string(src))
	}
	msgs := []chat.Message{{Role: "system", Content: "s"}, {Role: "user", Content: "u"}, {Role: "assistant", Content: "a"}}
	f.Fuzz(func(t *testing.T, src string) {
		tmpl, err := chat.Parse(src, map[string]string{"bos_token": "<s>", "eos_token": "</s>"})
		if err != nil {
			return
		}
		_, _ = tmpl.Render(msgs, chat.Options{AddGenerationPrompt: true, Now: time.Unix(0, 0)})
	})
}
