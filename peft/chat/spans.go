package chat

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Span is the half-open range [Start, End) of bytes of a text, or of tokens of a sequence.
type Span struct{ Start, End int }

// Rendered is a conversation formatted by its template, with where each assistant turn lies.
type Rendered struct {
	// Text is the formatted conversation, as Render returns it.
	Text string
	// Assistant holds, for each assistant message in order, the bytes of Text the model learns to
	// write: from the end of the assistant header before it (the text add_generation_prompt
	// ends with) through its end-of-turn marker (<|eot_id|>, <|im_end|>, </s>), without the
	// whitespace a template writes after the marker. What the template adds to the turn is
	// included: Qwen3's <think> block around the reasoning, for one.
	Assistant []Span
}

// RenderSpans formats msgs as Render does and finds each assistant turn by rendering the
// conversation's prefixes: the messages before the turn with the generation prompt end where
// the turn starts, and the messages through it end where it ends. That needs a template that
// writes every turn the same whatever follows it; Qwen3's, for one, writes the last assistant
// turn differently from earlier ones, and RenderSpans then reports the first turn it cannot
// place, so that such conversations can be cut into one example per assistant turn.
func (t *Template) RenderSpans(msgs []Message, opts Options) (Rendered, error) {
	if opts.Now.IsZero() {
		opts.Now = time.Now()
	}
	full, err := t.render(msgs, opts.AddGenerationPrompt, opts)
	if err != nil {
		return Rendered{}, err
	}
	r := Rendered{Text: full}
	for i, m := range msgs {
		if m.Role != "assistant" {
			continue
		}
		before, err := t.render(msgs[:i], true, opts)
		if err != nil {
			return Rendered{}, fmt.Errorf("chat: the messages before assistant message %d: %w", i, err)
		}
		through, err := t.render(msgs[:i+1], false, opts)
		if err != nil {
			return Rendered{}, fmt.Errorf("chat: the messages through assistant message %d: %w", i, err)
		}
		if !strings.HasPrefix(through, before) || !strings.HasPrefix(full, through) {
			return Rendered{}, fmt.Errorf("chat: assistant message %d: %w", i, ErrRewritesTurns)
		}
		r.Assistant = append(r.Assistant, turnSpan(before, through))
	}
	return r, nil
}

// ErrRewritesTurns is returned (wrapped) by RenderSpans for a template that writes a turn
// differently once later messages follow (Qwen3's drops the <think> block of earlier turns):
// such a conversation trains as one example per assistant turn (RenderLastTurn).
var ErrRewritesTurns = errors.New("the template writes the conversation up to this turn differently from the whole " +
	"conversation (it rewrites earlier turns, as Qwen3's does), so the turn cannot be placed in it; " +
	"make one example per assistant turn, each ending with its turn (RenderLastTurn)")

// RenderLastTurn formats msgs, which end with an assistant message, and places only that last
// turn: the conversation up to it is context. For templates that rewrite earlier turns, a
// conversation becomes one such example per assistant turn, each rendered as the model sees
// it when that turn is the newest.
func (t *Template) RenderLastTurn(msgs []Message, opts Options) (Rendered, error) {
	if len(msgs) == 0 || msgs[len(msgs)-1].Role != "assistant" {
		return Rendered{}, errors.New("chat: RenderLastTurn needs a conversation that ends with an assistant message")
	}
	if opts.Now.IsZero() {
		opts.Now = time.Now()
	}
	full, err := t.render(msgs, false, opts)
	if err != nil {
		return Rendered{}, err
	}
	before, err := t.render(msgs[:len(msgs)-1], true, opts)
	if err != nil {
		return Rendered{}, fmt.Errorf("chat: the messages before the last assistant message: %w", err)
	}
	if !strings.HasPrefix(full, before) {
		return Rendered{}, fmt.Errorf("chat: the template does not write the last assistant turn after its generation prompt")
	}
	return Rendered{Text: full, Assistant: []Span{turnSpan(before, full)}}, nil
}

// turnSpan is the turn that text adds after before, without the whitespace after its end marker.
func turnSpan(before, text string) Span {
	return Span{Start: len(before), End: max(len(strings.TrimRight(text, " \t\r\n")), len(before))}
}

// Encoder tokenizes text without adding special tokens of its own (a chat template writes the
// BOS it wants), as *tokenizer.Tokenizer's EncodeNoSpecial does.
type Encoder interface {
	EncodeNoSpecial(text string) []int
}

// Tokens is a rendered conversation's token ids with where the assistant turns lie.
type Tokens struct {
	// IDs are the tokens of the whole text, as transformers' apply_chat_template(tokenize=True)
	// gives them (no special tokens added beyond what the template writes).
	IDs []int
	// Assistant holds the token range of each assistant turn, in the order of
	// Rendered.Assistant.
	Assistant []Span
}

// Encode tokenizes the rendered text and maps each assistant span to its tokens. A span
// boundary must fall between tokens: Encode checks that the text before it tokenizes to the
// first tokens of the whole, and otherwise reports the turn whose boundary falls inside a token
// rather than guess which side that token belongs to.
func (r Rendered) Encode(enc Encoder) (Tokens, error) {
	whole := enc.EncodeNoSpecial(r.Text)
	boundary := func(turn, at int) (int, error) {
		prefix := enc.EncodeNoSpecial(r.Text[:at])
		if len(prefix) > len(whole) || !slices.Equal(prefix, whole[:len(prefix)]) {
			return 0, fmt.Errorf("chat: assistant turn %d: byte %d of the text falls inside a token", turn, at)
		}
		return len(prefix), nil
	}
	toks := Tokens{IDs: whole}
	for k, s := range r.Assistant {
		start, err := boundary(k, s.Start)
		if err != nil {
			return Tokens{}, err
		}
		end, err := boundary(k, s.End)
		if err != nil {
			return Tokens{}, err
		}
		toks.Assistant = append(toks.Assistant, Span{Start: start, End: end})
	}
	return toks, nil
}

// Mask is true for each token of an assistant turn: the tokens a fine-tune computes its loss on.
func (t Tokens) Mask() []bool {
	mask := make([]bool, len(t.IDs))
	for _, s := range t.Assistant {
		for i := s.Start; i < s.End; i++ {
			mask[i] = true
		}
	}
	return mask
}
