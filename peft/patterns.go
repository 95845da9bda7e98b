package peft

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
)

// Pattern is one entry of a Patterns list: a regular expression and the value it gives.
type Pattern[T any] struct {
	Key   string
	Value T
}

// Patterns are per-layer overrides in Hugging Face PEFT's rank_pattern / alpha_pattern form: an
// ordered list of regular expressions with a value each. A key matches a layer path when
// `(.*\.)?(key)$` matches the whole path (PEFT's rule: the key matches the end of the path,
// starting at its beginning or after a dot), and the first matching key in order wins, as PEFT
// takes the first in its dict's order, which is the file's order when it reads a config.
//
// In JSON it is an object whose keys keep their order, so a file we write resolves the same in
// PEFT as here.
type Patterns[T any] []Pattern[T]

// Lookup returns the value of the first key that matches path.
func (p Patterns[T]) Lookup(path string) (value T, found bool) {
	for _, e := range p {
		re, err := regexp.Compile(`^(?:.*\.)?(?:` + e.Key + `)$`)
		if err == nil && re.MatchString(path) {
			return e.Value, true
		}
	}
	return value, false
}

// Validate checks that every key is a valid regular expression and appears once; what names the
// field in errors ("lora: rank_pattern").
func (p Patterns[T]) Validate(what string) error {
	seen := map[string]bool{}
	for _, e := range p {
		if _, err := regexp.Compile(e.Key); err != nil {
			return fmt.Errorf("%s key %q is not a valid regular expression: %w", what, e.Key, err)
		}
		if seen[e.Key] {
			return fmt.Errorf("%s: key %q appears twice", what, e.Key)
		}
		seen[e.Key] = true
	}
	return nil
}

// MarshalJSON writes the patterns as a JSON object, keys in order.
func (p Patterns[T]) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, e := range p {
		if i > 0 {
			b.WriteByte(',')
		}
		key, err := json.Marshal(e.Key)
		if err != nil {
			return nil, err
		}
		value, err := json.Marshal(e.Value)
		if err != nil {
			return nil, err
		}
		b.Write(key)
		b.WriteByte(':')
		b.Write(value)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// UnmarshalJSON reads a JSON object (or null, for none), keeping the keys in the file's order.
// A key given twice is an error: JSON decoders disagree on which one wins.
func (p *Patterns[T]) UnmarshalJSON(data []byte) error {
	if string(bytes.TrimSpace(data)) == "null" {
		*p = nil
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return fmt.Errorf("patterns must be a JSON object of regular expression to value")
	}
	var out Patterns[T]
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, _ := tok.(string)
		if seen[key] {
			return fmt.Errorf("pattern key %q appears twice", key)
		}
		seen[key] = true
		var value T
		if err := dec.Decode(&value); err != nil {
			return fmt.Errorf("pattern %q: %w", key, err)
		}
		out = append(out, Pattern[T]{Key: key, Value: value})
	}
	if _, err := dec.Token(); err != nil {
		return err
	}
	*p = out
	return nil
}
