// MQTT 5 message properties as the application gives them (set_will(),
// publish(), connect()'s user properties): checked once when given, kept
// in a tuple, and handed to the engine as it writes a packet (for a
// publish in flight, again when it is sent after a reconnect). Part of
// modmqtt.c's translation unit.

// The properties of a message, in the order they are kept.
enum {
    PROPERTY_DELAY,
    PROPERTY_EXPIRY,
    PROPERTY_CONTENT_TYPE,
    PROPERTY_RESPONSE_TOPIC,
    PROPERTY_CORRELATION_DATA,
    PROPERTY_PAYLOAD_FORMAT,
    PROPERTY_USER,
    PROPERTY_COUNT,
};

static mqtt_bytes_t optional_bytes(mp_obj_t object) {
    return object == mp_const_none ? no_bytes() : bytes_of_buffer(object);
}

// User properties as given (a dict, or an iterable of (name, value)
// pairs, both str; names may repeat) as a tuple of pairs. Raises
// TypeError for anything else.
static mp_obj_t user_pairs_of(mp_obj_t given) {
    mp_obj_t list = mp_obj_new_list(0, NULL);
    mp_obj_t pair[2];
    if (mp_obj_is_type(given, &mp_type_dict)) {
        // Its entries, read from its table: a call of its items() (a bound
        // method called with no argument) passes memcpy a null pointer in
        // MicroPython, which the sanitizer build reports.
        mp_map_t *map = mp_obj_dict_get_map(given);
        for (size_t i = 0; i < map->alloc; i++) {
            if (mp_map_slot_is_filled(map, i)) {
                pair[0] = map->table[i].key;
                pair[1] = map->table[i].value;
                mp_obj_list_append(list, mp_obj_new_tuple(2, pair));
            }
        }
    } else {
        mp_obj_iter_buf_t iter_buf;
        mp_obj_t iterable = mp_getiter(given, &iter_buf);
        mp_obj_t item;
        while ((item = mp_iternext(iterable)) != MP_OBJ_STOP_ITERATION) {
            mp_obj_t *fields;
            mp_obj_get_array_fixed_n(item, 2, &fields);
            mp_obj_list_append(list, mp_obj_new_tuple(2, fields));
        }
    }
    size_t n;
    mp_obj_t *items;
    mp_obj_list_get(list, &n, &items);
    for (size_t i = 0; i < n; i++) {
        mp_obj_t *fields = ((mp_obj_tuple_t *)MP_OBJ_TO_PTR(items[i]))->items;
        if (!mp_obj_is_str(fields[0]) || !mp_obj_is_str(fields[1])) {
            mp_raise_TypeError(MP_ERROR_TEXT("user properties are (str, str) pairs"));
        }
    }
    return mp_obj_new_tuple(n, items);
}

// The user property at `index` of a tuple of pairs (mqtt_user_properties_t).
// Never raises: user_pairs_of() made every pair two str.
static bool user_pair(void *context, size_t index, mqtt_bytes_t *name, mqtt_bytes_t *value) {
    mp_obj_tuple_t *pairs = context;
    if (index >= pairs->len) {
        return false;
    }
    mp_obj_tuple_t *pair = MP_OBJ_TO_PTR(pairs->items[index]);
    size_t len;
    const char *data = mp_obj_str_get_data(pair->items[0], &len);
    *name = (mqtt_bytes_t) { .data = (const uint8_t *)data, .len = len };
    data = mp_obj_str_get_data(pair->items[1], &len);
    *value = (mqtt_bytes_t) { .data = (const uint8_t *)data, .len = len };
    return true;
}

// The engine's view of a tuple of pairs from user_pairs_of(), or of None.
static mqtt_user_properties_t user_properties_of(mp_obj_t pairs) {
    if (pairs == mp_const_none) {
        return (mqtt_user_properties_t) { .context = NULL, .pair = NULL };
    }
    return (mqtt_user_properties_t) { .context = MP_OBJ_TO_PTR(pairs), .pair = user_pair };
}

// Fills `*out` from a message's properties as kept_properties() keeps them.
// Raises TypeError or ValueError for a bad one (kept_properties() calls it
// to check them; later calls do not raise).
static void message_properties_of(mp_obj_t kept, mqtt_message_properties_t *out) {
    size_t n;
    mp_obj_t *items;
    mp_obj_tuple_get(kept, &n, &items);
    mp_obj_t delay = items[PROPERTY_DELAY], expiry = items[PROPERTY_EXPIRY], format = items[PROPERTY_PAYLOAD_FORMAT];
    mp_obj_t content_type = items[PROPERTY_CONTENT_TYPE], response_topic = items[PROPERTY_RESPONSE_TOPIC];
    *out = (mqtt_message_properties_t) {
        .payload_format = format == mp_const_none ? 0 : (uint8_t)non_negative_of(format, "payload_format"),
        .has_message_expiry = expiry != mp_const_none,
        .message_expiry_s = expiry == mp_const_none ? 0 : non_negative_of(expiry, "expiry"),
        .will_delay_s = delay == mp_const_none ? 0 : non_negative_of(delay, "delay"),
        .content_type = content_type == mp_const_none ? no_bytes() : bytes_of_str(content_type, "content_type"),
        .response_topic = response_topic == mp_const_none ? no_bytes() : bytes_of_str(response_topic, "response_topic"),
        .correlation_data = optional_bytes(items[PROPERTY_CORRELATION_DATA]),
        .user_properties = user_properties_of(items[PROPERTY_USER]),
    };
    if (format != mp_const_none && out->payload_format > 1) {
        mp_raise_ValueError(MP_ERROR_TEXT("payload_format must be 0 or 1"));
    }
    if (response_topic != mp_const_none) {
        check_topic(response_topic, false);
    }
}

// A message's properties as given (PROPERTY_COUNT objects, None where not
// given), checked and kept in a tuple; None when none is given. Only an
// MQTT 5 client takes them: ValueError("`what` need MQTTv5") otherwise.
static mp_obj_t kept_properties(mp_obj_mqtt_client_t *self, const mp_obj_t *given, const char *what) {
    bool any = false;
    for (size_t i = 0; i < PROPERTY_COUNT; i++) {
        any = any || given[i] != mp_const_none;
    }
    if (!any) {
        return mp_const_none;
    }
    if (!speaks_v5(self)) {
        mp_raise_msg_varg(&mp_type_ValueError, MP_ERROR_TEXT("%s need MQTTv5"), what);
    }
    mp_obj_t kept = mp_obj_new_tuple(PROPERTY_COUNT, given);
    mp_obj_tuple_t *tuple = MP_OBJ_TO_PTR(kept);
    if (given[PROPERTY_USER] != mp_const_none) {
        tuple->items[PROPERTY_USER] = user_pairs_of(given[PROPERTY_USER]);
    }
    mqtt_message_properties_t checked;
    message_properties_of(kept, &checked);
    return kept;
}

// The properties of an incoming message as a dict, from its property
// block as the engine kept it: the keywords publish() takes
// (message_expiry, content_type, response_topic, correlation_data,
// payload_format, user_properties as a list of (name, value)), and
// subscription_ids (a list), each present only when the message has it.
static mp_obj_t properties_dict(mp_obj_t block) {
    mp_buffer_info_t info;
    mp_get_buffer_raise(block, &info, MP_BUFFER_READ);
    mqtt_bytes_t bytes = { .data = info.buf, .len = info.len };
    mp_obj_t dict = mp_obj_new_dict(0);
    size_t offset = 0;
    mqtt_property_t property;
    while (mqtt_property_next(bytes, &offset, &property)) {
        qstr key;
        mp_obj_t value;
        switch (property.id) {
            case MQTT_PROPERTY_PAYLOAD_FORMAT:
                key = MP_QSTR_payload_format;
                value = MP_OBJ_NEW_SMALL_INT(property.number);
                break;
            case MQTT_PROPERTY_MESSAGE_EXPIRY:
                key = MP_QSTR_message_expiry;
                value = mp_obj_new_int_from_uint(property.number);
                break;
            case MQTT_PROPERTY_CONTENT_TYPE:
            case MQTT_PROPERTY_RESPONSE_TOPIC:
                key = property.id == MQTT_PROPERTY_CONTENT_TYPE ? MP_QSTR_content_type : MP_QSTR_response_topic;
                value = mp_obj_new_str((const char *)property.value.data, property.value.len);
                break;
            case MQTT_PROPERTY_CORRELATION_DATA:
                key = MP_QSTR_correlation_data;
                value = mp_obj_new_bytes(property.value.data, property.value.len);
                break;
            case MQTT_PROPERTY_SUBSCRIPTION_ID:
            case MQTT_PROPERTY_USER: {
                // The repeatable ones: a list each.
                key = property.id == MQTT_PROPERTY_USER ? MP_QSTR_user_properties : MP_QSTR_subscription_ids;
                mp_map_elem_t *slot = mp_map_lookup(mp_obj_dict_get_map(dict), MP_OBJ_NEW_QSTR(key), MP_MAP_LOOKUP_ADD_IF_NOT_FOUND);
                if (slot->value == MP_OBJ_NULL) {
                    slot->value = mp_obj_new_list(0, NULL);
                }
                mp_obj_t item = mp_obj_new_int_from_uint(property.number);
                if (property.id == MQTT_PROPERTY_USER) {
                    mp_obj_t pair[2] = {
                        mp_obj_new_str((const char *)property.name.data, property.name.len),
                        mp_obj_new_str((const char *)property.value.data, property.value.len),
                    };
                    item = mp_obj_new_tuple(2, pair);
                }
                mp_obj_list_append(slot->value, item);
                continue;
            }
            default:
                continue;
        }
        mp_obj_dict_store(dict, MP_OBJ_NEW_QSTR(key), value);
    }
    return dict;
}

// ---------------------------------------------------------------------------
// Topic aliases towards the broker: the engine sets them and says when a
// topic goes by one; the client keeps the topic each stands for.

// The topics of the topic aliases set on the link: a tuple of
// MQTT_TOPIC_ALIAS_MAX topic str (None where unset), made when first
// needed; MP_OBJ_NULL when there is no memory for it. Never raises.
static mp_obj_t alias_topics(mp_obj_mqtt_client_t *self) {
    mp_obj_t topics = option(self, OPTION_TOPIC_ALIASES);
    if (topics != mp_const_none) {
        return topics;
    }
    nlr_buf_t nlr;
    if (nlr_push(&nlr) != 0) {
        return MP_OBJ_NULL;
    }
    topics = mp_obj_new_tuple(MQTT_TOPIC_ALIAS_MAX, NULL);
    mp_obj_tuple_t *tuple = MP_OBJ_TO_PTR(topics);
    for (size_t i = 0; i < MQTT_TOPIC_ALIAS_MAX; i++) {
        tuple->items[i] = mp_const_none;
    }
    set_option(self, OPTION_TOPIC_ALIASES, topics);
    nlr_pop();
    return topics;
}

// What the engine's alias callbacks (mqtt_aliases_t) get: the client and
// the topic str of the publish being sent.
typedef struct _alias_context_t {
    mp_obj_mqtt_client_t *client;
    mp_obj_t topic;
} alias_context_t;

static bool alias_stands_for(void *context, uint16_t alias, mqtt_bytes_t topic) {
    alias_context_t *publish = context;
    mp_obj_t topics = option(publish->client, OPTION_TOPIC_ALIASES);
    if (topics == mp_const_none || alias == 0 || alias > MQTT_TOPIC_ALIAS_MAX) {
        return false;
    }
    mp_obj_t kept = ((mp_obj_tuple_t *)MP_OBJ_TO_PTR(topics))->items[alias - 1];
    if (kept == mp_const_none) {
        return false;
    }
    size_t len;
    const char *data = mp_obj_str_get_data(kept, &len);
    return len == topic.len && memcmp(data, topic.data, len) == 0;
}

// Keeps the publish's topic str (the bytes the engine gives are its own)
// for `alias`.
static bool alias_set(void *context, uint16_t alias, mqtt_bytes_t topic) {
    (void)topic;
    alias_context_t *publish = context;
    mp_obj_t topics = alias_topics(publish->client);
    if (topics == MP_OBJ_NULL || alias == 0 || alias > MQTT_TOPIC_ALIAS_MAX) {
        return false;
    }
    ((mp_obj_tuple_t *)MP_OBJ_TO_PTR(topics))->items[alias - 1] = publish->topic;
    return true;
}
